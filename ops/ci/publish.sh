#!/usr/bin/env bash
# Publishes a build as a fleetcast release and waits until the fleet runs it: the plain-shell
# form of ops/ci/github-release.yml, for any CI system.
#
#   ops/ci/publish.sh APP VERSION DIR
#
#   APP      the app's name (a-z, 0-9, '-', '_'), as the agents' apps[].name and the tracker's
#            [apps.APP] policy know it
#   VERSION  its semantic version, newer than the last one published (e.g. 1.4.0, 1.4.0-rc.1)
#   DIR      the built files, packaged as they are: DIR/bin/app becomes bin/app in the release,
#            file modes included (a fleetcast.toml at DIR's root names the command, health
#            check and hooks, if the package brings its own)
#
# Environment:
#   FLEETCAST_NATS_URL         the fleetcast NATS server (required), e.g. nats://nats.example.net:4222
#   FLEETCAST_NATS_CREDENTIALS CI's credentials file (creds/ci.creds of ops/nats/gen-accounts)
#   FLEETCAST_NATS_TLS_CA      the deployment's CA (tls/ca.pem); the CLI connects only with both
#   FLEETCAST_BIN              the fleetcast command (default: fleetcast on PATH)
#   FLEETCAST_PUBLISHED_BY     recorded with the release (default: CI's job if known, else user@host)
#   FLEETCAST_STORE_TIMEOUT    how long to wait for the release to be signed and stored (15m)
#   FLEETCAST_ROLLOUT_TIMEOUT  how long to wait for the rollout, e.g. 2h; a rollout waiting for
#                              `fleetcast approve` or an update window waits this long (2h)
#
# Exit status: 0 the release is stored and every targeted live host runs it; 3 the release was
# rejected (the reason is printed) or the rollout halted (a host rolled back or refused it);
# 4 the rollout was aborted by an operator; 124 a timeout; anything else an error.
set -euo pipefail
if [[ $# -ne 3 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
app="$1" version="$2" dir="$3"
: "${FLEETCAST_NATS_URL:?set FLEETCAST_NATS_URL to the fleetcast NATS server}"
export FLEETCAST_NATS_URL
fleetcast="${FLEETCAST_BIN:-fleetcast}"
store_timeout="${FLEETCAST_STORE_TIMEOUT:-15m}"
rollout_timeout="${FLEETCAST_ROLLOUT_TIMEOUT:-2h}"
published_by="${FLEETCAST_PUBLISHED_BY:-${CI_JOB_URL:-${BUILD_URL:-${USER:-ci}@$(uname -n)}}}"
[[ -d "$dir" ]] || { echo "publish: $dir is not a folder" >&2; exit 2; }
command -v "$fleetcast" >/dev/null || { echo "publish: $fleetcast not found (set FLEETCAST_BIN)" >&2; exit 2; }

# 1. Package: NAME-VERSION.zip, entries in a stable order, each file with its mode (the signed
#    manifest records it, and the agent installs it so). Written beside the folder.
archive="$(cd "$(dirname "$dir")" && pwd)/$app-$version.zip"
python3 - "$dir" "$archive" <<'PY'
import os, sys, zipfile
src, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out + ".tmp", "w", zipfile.ZIP_DEFLATED) as z:
    for dirpath, dirnames, files in os.walk(src):
        dirnames.sort()
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            info = zipfile.ZipInfo.from_file(full, os.path.relpath(full, src))
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(full, "rb") as f:
                z.writestr(info, f.read())
os.replace(out + ".tmp", out)
PY
echo "publish: packaged $archive"

# 2. Publish and wait until it is signed and stored (exit 3 with the reason when rejected).
"$fleetcast" publish "$archive" --published-by "$published_by" --wait --timeout "$store_timeout"

# 3. Follow the rollout ring by ring: 0 completed, 3 halted, 4 aborted, 5 superseded by a newer
#    release or a rollback, 6 not a stored release.
status=0
timeout "$rollout_timeout" "$fleetcast" rollout watch "$app" --version "$version" || status=$?
case "$status" in
    0) echo "publish: $app $version runs on every targeted host" ;;
    3) echo "publish: the rollout of $app $version halted; see \`fleetcast status\` and the dashboard" >&2 ;;
    4) echo "publish: the rollout of $app $version was aborted" >&2 ;;
    5) echo "publish: $app $version was superseded (a newer release or a rollback) before its rollout ended" >&2 ;;
    6) echo "publish: $app $version is not a stored release" >&2 ;;
    124) echo "publish: the rollout of $app $version did not finish within $rollout_timeout" >&2 ;;
esac
exit "$status"
