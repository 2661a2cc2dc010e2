#!/usr/bin/env bash
# Installs (or updates, or removes) the fleetcast agent on a Linux host with systemd.
#
#   install-agent.sh --binary ./fleetcast-agent --nats-url nats://nats.example.net:4222 \
#       --credentials web-1.creds --ca ca.pem \
#       --trusted-root-file root-1.json --ring canary --app collector='bin/collector --config c.yaml'
#   install-agent.sh --binary ./fleetcast-agent            # later: update the binary and unit only
#   install-agent.sh --uninstall [--purge]
#
# What it does, each step only when needed, so running it again changes nothing (and restarts
# nothing) unless an input changed:
#   - a system user and group `fleetcast` (no login shell, home /var/lib/fleetcast) for the agent,
#     and one for each app (`fc-<app>` unless --app-user names another), which the agent runs the
#     app, its hooks and health command as: an app cannot read the agent's credentials nor write
#     its state or its own installed files (docs/operations.md, "Apps as their own users");
#   - /usr/local/bin/fleetcast-agent from --binary (the one built with `--profile agent`, or
#     copied out of the fleetcast image: /usr/local/bin/fleetcast-agent there), and
#     /usr/local/bin/fleetcast-launcher from --launcher (default: fleetcast-launcher beside
#     --binary), which systemd starts and which runs the agent: agent releases published like an
#     app's then update the agent without restarting the apps (docs/self-update.md);
#   - /etc/fleetcast/agent.toml from the options below, written only if it does not exist yet
#     (or with --overwrite-config); trusted public keys and the CA are copied into
#     /etc/fleetcast, readable by the agent but not writable by it; the NATS credentials
#     (secret) are readable by the agent's user alone (0600, owned by it);
#   - /var/lib/fleetcast (the agent's data_dir lives below it), owned by the user, 0711 (apps
#     pass through to their own folders, list nothing);
#   - the systemd unit fleetcast-agent.service (installed next to this script), enabled and
#     started; restarted when a binary, the unit or the config changed. Restarting the service
#     restarts its apps (drained first): update agents by publishing agent releases instead
#     (docs/self-update.md), or ring by ring in a quiet hour.
#
# Options (for a new config: --nats-url, --credentials and --ca (or --insecure-dev), one
# trusted key and one app are required):
#   --binary PATH            the fleetcast-agent binary to install
#   --launcher PATH          the fleetcast-launcher binary (default: beside --binary)
#   --nats-url URL           NATS server, e.g. nats://hub.example.net:4222 or a site's leaf node;
#                            a cluster's nodes as a comma-separated list
#   --credentials FILE       this agent's own NATS .creds file (ops/nats/gen-accounts --agent;
#                            copied to /etc/fleetcast/agent.creds, 0600, owned by the agent's
#                            user)
#   --ca FILE                the deployment's CA (gen-accounts' tls/ca.pem): the agent connects
#                            only over TLS to a server whose certificate it signed
#   --insecure-dev           neither: an unauthenticated, unencrypted connection, for a
#                            development server on this machine only (nats.insecure_dev)
#   --trusted-root-file FILE the first root of trust (`fleetcast root`; recommended: signing keys
#                            then rotate without touching this host)
#   --trusted-key-file FILE  or a pinned release-signing public key file (repeatable)
#   --trusted-key TEXT       the same, inline (repeatable)
#   --agent-id ID            this host's id in the fleet (default: the short host name)
#   --ring RING              its ring (default: default)
#   --app NAME[=COMMAND]     an app to supervise (repeatable); COMMAND is split on spaces; without
#                            one, every package must name its command in its fleetcast.toml
#   --app-user NAME=USER     run app NAME as USER (created as a system user if missing) instead
#                            of fc-NAME; USER "-" runs it as the agent's own user (not isolated)
#   --apps-file FILE         [[apps]] tables (command, env, health, crash, grace, user, group)
#                            appended as they are, for anything --app cannot say; the users they
#                            name (user = "name") are created if missing
#   --overwrite-config       rewrite /etc/fleetcast/agent.toml from the options
#   --uninstall              stop and disable the service, remove the unit and the binary
#   --purge                  with --uninstall: also remove /etc/fleetcast, /var/lib/fleetcast
#                            (every installed app version and app data folder), the agent's user
#                            and the app users this script created
set -euo pipefail

unit_name=fleetcast-agent.service
bin_path=/usr/local/bin/fleetcast-agent
launcher_path=/usr/local/bin/fleetcast-launcher
unit_path=/etc/systemd/system/$unit_name
conf_dir=/etc/fleetcast
config=$conf_dir/agent.toml
state_dir=/var/lib/fleetcast
user=fleetcast
# The comment of the app users this script creates (how --purge finds them).
app_user_comment="fleetcast app"
here="$(cd "$(dirname "$0")" && pwd)"

die() {
    echo "install-agent: $*" >&2
    exit 1
}
say() { echo "install-agent: $*"; }

binary="" launcher="" nats_url="" credentials="" ca_file="" agent_id="" ring="default" apps_file=""
overwrite=false uninstall=false purge=false insecure_dev=false
key_files=() keys=() apps=() root_file="" app_users=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary | --launcher | --nats-url | --credentials | --ca | --trusted-root-file | --trusted-key-file | \
            --trusted-key | --agent-id | --ring | --app | --app-user | --apps-file)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case "$1" in
                --binary) binary="$2" ;;
                --launcher) launcher="$2" ;;
                --nats-url) nats_url="$2" ;;
                --credentials) credentials="$2" ;;
                --ca) ca_file="$2" ;;
                --trusted-root-file) root_file="$2" ;;
                --trusted-key-file) key_files+=("$2") ;;
                --trusted-key) keys+=("$2") ;;
                --agent-id) agent_id="$2" ;;
                --ring) ring="$2" ;;
                --app) apps+=("$2") ;;
                --app-user) app_users+=("$2") ;;
                --apps-file) apps_file="$2" ;;
            esac
            shift 2
            ;;
        --overwrite-config) overwrite=true && shift ;;
        --insecure-dev) insecure_dev=true && shift ;;
        --uninstall) uninstall=true && shift ;;
        --purge) purge=true && shift ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ "$(id -u)" == 0 ]] || die "run as root"
for value in "$binary" "$launcher" "$nats_url" "$credentials" "$ca_file" "$agent_id" "$ring" "$apps_file" "$root_file" \
    "${key_files[@]}" "${keys[@]}" "${apps[@]}" "${app_users[@]}"; do
    [[ "$value" != *[[:cntrl:]]* ]] || die "control character in ${value@Q}"
done
# systemd is running (a booted host), or not (an image being built): units are then only enabled.
systemd_running=false
[[ -d /run/systemd/system ]] && systemd_running=true

if $uninstall; then
    if $systemd_running && systemctl is-active --quiet "$unit_name"; then
        say "stopping $unit_name (its apps are drained and stopped)"
        systemctl stop "$unit_name"
    fi
    if [[ -f "$unit_path" ]]; then
        systemctl disable "$unit_name" >/dev/null 2>&1 || true
        rm -f "$unit_path" "/etc/systemd/system/multi-user.target.wants/$unit_name"
        $systemd_running && systemctl daemon-reload
        say "removed $unit_path"
    fi
    rm -f "$bin_path" "$launcher_path"
    if $purge; then
        rm -rf "$conf_dir" "$state_dir"
        if id -u "$user" >/dev/null 2>&1; then userdel "$user"; fi
        # The app users this script created (marked by their comment).
        while IFS=: read -r name _ _ _ comment _; do
            if [[ "$comment" == "$app_user_comment" ]]; then userdel "$name"; fi
        done < <(getent passwd)
        say "removed $conf_dir, $state_dir, the user $user and the app users"
    else
        say "kept $conf_dir and $state_dir (installed app versions); --purge removes them"
    fi
    exit 0
fi

[[ -f "$here/$unit_name" ]] || die "$here/$unit_name not found (keep this script next to it)"
if [[ -z "$binary" && ! -x "$bin_path" ]]; then
    die "--binary is needed for a first install"
fi
if [[ -z "$launcher" && -n "$binary" ]]; then
    launcher="$(dirname "$binary")/fleetcast-launcher"
fi
if [[ ! -f "$launcher" && ! -x "$launcher_path" ]]; then
    die "the launcher ${launcher:-fleetcast-launcher} is needed for a first install (--launcher PATH; it comes with the agent, in the image at /usr/local/bin/fleetcast-launcher)"
fi

# TOML basic string: backslash and double quote escaped (control characters are refused below,
# before anything is written).
toml_string() {
    local s="${1//\\/\\\\}"
    printf '"%s"' "${s//\"/\\\"}"
}
name_ok() { [[ "$1" =~ ^[a-z0-9][a-z0-9_-]{0,63}$ ]]; }

# 1. The user.
if ! id -u "$user" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir "$state_dir" --no-create-home \
        --shell /usr/sbin/nologin --comment "fleetcast agent" "$user"
    say "created the system user $user"
fi
# ensure_app_user NAME: a system user (and group) for an app, no login, no home, in no group of
# the agent's.
ensure_app_user() {
    local name="$1"
    if id -u "$name" >/dev/null 2>&1; then
        [[ "$(id -u "$name")" != 0 && "$(id -u "$name")" != "$(id -u "$user")" ]] ||
            die "app user $name: an app runs as a user of its own, not as root or $user"
        return 0
    fi
    [[ "$name" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] ||
        die "app user ${name@Q}: a-z, 0-9, '_' and '-', at most 32 characters (--app-user NAME=USER names another)"
    useradd --system --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin --comment "$app_user_comment" "$name"
    say "created the system user $name"
}
# app_user APP: the user an --app runs as ("-": the agent's own).
app_user() {
    local app="$1" pair
    for pair in "${app_users[@]}"; do
        if [[ "${pair%%=*}" == "$app" ]]; then
            printf '%s' "${pair#*=}"
            return
        fi
    done
    printf 'fc-%s' "$app"
}

changed=false
# install_file SRC DEST MODE OWNER:GROUP: copies when the content, mode or owner differs.
install_file() {
    local src="$1" dest="$2" mode="$3" owner="$4"
    if [[ -f "$dest" ]] && cmp -s "$src" "$dest" &&
        [[ "$(stat -c '%a %U:%G' "$dest")" == "${mode#0} $owner" ]]; then
        return 0
    fi
    install -D -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$src" "$dest"
    changed=true
    say "installed $dest"
}

# 2. The binary: checked to run on this host before it replaces the one in place.
if [[ -n "$binary" ]]; then
    [[ -f "$binary" ]] || die "$binary not found"
    "$binary" --help >/dev/null 2>&1 || die "$binary does not run on this host (wrong architecture?)"
    install_file "$binary" "$bin_path" 0755 root:root
fi
if [[ -n "$launcher" && -f "$launcher" ]]; then
    "$launcher" --version >/dev/null 2>&1 || die "$launcher does not run on this host (wrong architecture?)"
    install_file "$launcher" "$launcher_path" 0755 root:root
fi

# 3. Folders. The agent only writes below /var/lib/fleetcast (the unit's ReadWritePaths).
install -d -m 0755 -o root -g root "$conf_dir"
install -d -m 0755 -o root -g root "$conf_dir/keys"
# 0711: an app running as its own user passes through to its version and data folder (the agent
# keeps its credentials, journals and trust state closed below it).
install -d -m 0711 -o "$user" -g "$user" "$state_dir"

# 4. The config, from the options, unless one is there already.
if [[ ! -f "$config" ]] || $overwrite; then
    [[ -n "$nats_url" ]] || die "--nats-url is needed to write $config"
    [[ -n "$root_file" || ${#key_files[@]} -gt 0 || ${#keys[@]} -gt 0 ]] ||
        die "a --trusted-root-file, --trusted-key-file or --trusted-key is needed to write $config"
    [[ ${#apps[@]} -gt 0 || -n "$apps_file" ]] || die "an --app or --apps-file is needed to write $config"
    # Closed by default: the agent's own identity and TLS, or an explicit development mode.
    if ! $insecure_dev; then
        [[ -n "$credentials" && -n "$ca_file" ]] ||
            die "--credentials and --ca are needed to write $config (the agent refuses an unauthenticated or unencrypted connection); --insecure-dev for a development server on this machine only"
    fi
    if [[ -z "$agent_id" ]]; then
        host="$(uname -n)"
        agent_id="$(printf '%s' "${host%%.*}" | tr -c 'A-Za-z0-9_-' '-')"
    fi
    [[ "$agent_id" =~ ^[A-Za-z0-9_-]+$ ]] || die "agent id ${agent_id@Q}: letters, digits, '-' and '_' only"
    name_ok "$ring" || die "ring ${ring@Q}: a-z, 0-9, '-' and '_', starting with a letter or digit"
    for app in "${apps[@]}"; do
        name_ok "${app%%=*}" ||
            die "app name ${app%%=*}: a-z, 0-9, '-' and '_', starting with a letter or digit"
    done
    for pair in "${app_users[@]}"; do
        [[ "$pair" == *=* ]] || die "--app-user ${pair@Q}: NAME=USER"
    done
    for app in "${apps[@]}"; do
        app_as="$(app_user "${app%%=*}")"
        [[ "$app_as" == - ]] || ensure_app_user "$app_as"
    done

    # Keys and credentials first, into /etc/fleetcast where the agent can read but not write.
    key_list="" inline_list="" creds_line="" root_line="" tls_line="" dev_line=""
    if [[ -n "$root_file" ]]; then
        [[ -f "$root_file" ]] || die "root file $root_file not found"
        install_file "$root_file" "$conf_dir/keys/root-1.json" 0644 root:root
        root_line="trusted_root_file = $(toml_string "$conf_dir/keys/root-1.json")"
    fi
    for f in "${key_files[@]}"; do
        [[ -f "$f" ]] || die "trusted key file $f not found"
        dest="$conf_dir/keys/$(basename "$f")"
        install_file "$f" "$dest" 0644 root:root
        key_list+="${key_list:+, }$(toml_string "$dest")"
    done
    for k in "${keys[@]}"; do inline_list+="${inline_list:+, }$(toml_string "$k")"; done
    if [[ -n "$credentials" ]]; then
        [[ -f "$credentials" ]] || die "credentials file $credentials not found"
        # The agent's alone: no app user (nor anyone in the agent's group) may read them.
        install_file "$credentials" "$conf_dir/agent.creds" 0600 "$user:$user"
        # Replies under the agent's own prefix: with a per-agent identity (ops/nats/gen-accounts)
        # it may read no other.
        creds_line="credentials = $(toml_string "$conf_dir/agent.creds")"$'\n'"inbox_prefix = $(toml_string "_INBOX.$agent_id")"
    fi
    if [[ -n "$ca_file" ]]; then
        [[ -f "$ca_file" ]] || die "CA file $ca_file not found"
        install_file "$ca_file" "$conf_dir/nats-ca.pem" 0644 root:root
        tls_line="[nats.tls]"$'\n'"ca_file = $(toml_string "$conf_dir/nats-ca.pem")"
    fi
    if $insecure_dev && [[ -z "$credentials" || -z "$ca_file" ]]; then
        say "WARNING: --insecure-dev: this agent connects without authentication or TLS (development only)"
        dev_line="insecure_dev = true"
    fi
    if [[ -n "$apps_file" ]]; then
        [[ -f "$apps_file" ]] || die "$apps_file not found"
        grep -q '^\[\[apps\]\]' "$apps_file" || die "$apps_file has no [[apps]] table"
        while IFS= read -r named; do
            ensure_app_user "$named"
        done < <(sed -n 's/^[[:space:]]*user[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$apps_file")
    fi

    tmp="$(mktemp)"
    trap 'rm -f "$tmp"' EXIT
    {
        echo "# Written by install-agent.sh; every setting and its default: docs/operations.md."
        echo "# Host-specific changes are fine here: the script does not overwrite this file"
        echo "# unless asked to (--overwrite-config)."
        echo "agent_id = $(toml_string "$agent_id")"
        echo "ring = $(toml_string "$ring")"
        echo "data_dir = $(toml_string "$state_dir/agent")"
        [[ -z "$root_line" ]] || echo "$root_line"
        [[ -z "$key_list" ]] || echo "trusted_key_files = [$key_list]"
        [[ -z "$inline_list" ]] || echo "trusted_keys = [$inline_list]"
        echo
        echo "[nats]"
        echo "url = $(toml_string "$nats_url")"
        [[ -z "$creds_line" ]] || echo "$creds_line"
        [[ -z "$dev_line" ]] || echo "$dev_line"
        [[ -z "$tls_line" ]] || echo "$tls_line"
        for app in "${apps[@]}"; do
            name="${app%%=*}"
            echo
            echo "[[apps]]"
            echo "name = $(toml_string "$name")"
            app_as="$(app_user "$name")"
            [[ "$app_as" == - ]] || echo "user = $(toml_string "$app_as")"
            if [[ "$app" == *=* ]]; then
                read -r -a words <<<"${app#*=}"
                list=""
                for w in "${words[@]}"; do list+="${list:+, }$(toml_string "$w")"; done
                echo "command = [$list]"
            fi
        done
        if [[ -n "$apps_file" ]]; then
            echo
            cat "$apps_file"
        fi
    } >"$tmp"
    install_file "$tmp" "$config" 0640 "root:$user"
    rm -f "$tmp"
    trap - EXIT
else
    say "kept the existing $config (--overwrite-config rewrites it)"
fi

# 5. The unit: enabled at boot, started now, restarted when anything above changed.
install_file "$here/$unit_name" "$unit_path" 0644 root:root
if $systemd_running; then
    systemctl daemon-reload
    systemctl enable --quiet "$unit_name"
    if ! systemctl is-active --quiet "$unit_name"; then
        systemctl start "$unit_name"
        say "started $unit_name"
    elif $changed; then
        systemctl restart "$unit_name"
        say "restarted $unit_name"
    else
        say "nothing changed; $unit_name keeps running"
    fi
    say "logs: journalctl -u $unit_name -f"
else
    if ! systemctl enable --quiet "$unit_name" 2>/dev/null; then
        # No systemctl able to work offline: the symlink `enable` would make.
        mkdir -p /etc/systemd/system/multi-user.target.wants
        ln -sf "$unit_path" "/etc/systemd/system/multi-user.target.wants/$unit_name"
    fi
    say "systemd is not running here: $unit_name is enabled and starts at the next boot"
fi
