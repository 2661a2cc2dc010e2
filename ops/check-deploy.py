#!/usr/bin/env python3
"""The checks of ops/check-deploy that need to read files rather than run a linter.

  check-deploy.py compose [--nats-dir DIR] FILE...   what the Compose Specification's schema
                                    cannot see, and no unauthenticated NATS port published
  check-deploy.py nats FILE...      no NATS listener open to the network without authentication
                                    and TLS
  check-deploy.py grafana FILE...   Grafana dashboards against the metrics the code exports
  check-deploy.py selftest          every bad fixture in ops/check-deploy-fixtures/ fails

compose: every named volume, network and depends_on target is declared; every bind-mounted
file or folder exists; every FLEETCAST_<SERVICE>_<KEY> variable given to a fleetcast service
names a setting that service has (the settings structs reject unknown keys, so a misspelt
variable is a container that never starts); every TOML file passed with --config parses and
holds only known keys. The known keys are read from the settings structs in services/.
Exposure: a NATS server a compose file runs (its `-c` file, read from --nats-dir, where the
generated ./auth/ exists, when given) may publish a port on an address other than 127.0.0.1
only if that listener authenticates and uses TLS; a file with a fleetcast service set to
insecure_dev publishes every port on 127.0.0.1 only.

nats: every listener (client, cluster, leafnodes, gateway, websocket, mqtt) on an address
other than loopback needs authentication (operator/JWT, accounts with users, authorization;
for routes, TLS with `verify`) and TLS; monitoring (http) on loopback only. A file marked
`# check-deploy: development only` is exempt here, and the compose check then holds it to
127.0.0.1. Includes are followed (relative to the including file).

Needs ruamel.yaml (installed by ops/check-deploy) and Python 3.11+ (tomllib).
"""

import json
import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python < 3.11
    raise SystemExit("check-deploy.py needs Python 3.11 or newer (tomllib)")

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent

# The binary a container runs → the crate holding its settings and its variables' prefix.
SERVICES = {
    "fleetcast-watcher": ("services/watcher/src/settings.rs", "WATCHER"),
    "fleetcast-signer": ("services/signer/src/settings.rs", "SIGNER"),
    "fleetcast-distributor": ("services/distributor/src/settings.rs", "DISTRIBUTOR"),
    "fleetcast-tracker": ("services/tracker/src/settings.rs", "TRACKER"),
    "fleetcast-agent": ("services/agent/src/settings.rs", "AGENT"),
}
# Read by every binary or by the CLI, not settings keys.
GENERIC_VARIABLES = {"FLEETCAST_LOG_FORMAT", "FLEETCAST_NATS_URL", "FLEETCAST_PUBLISHED_BY",
                     "FLEETCAST_NATS_CREDENTIALS", "FLEETCAST_NATS_TLS_CA",
                     "FLEETCAST_NATS_TLS_CERT", "FLEETCAST_NATS_TLS_KEY",
                     "FLEETCAST_NATS_INSECURE_DEV"}

# Nested settings: field name → (file, struct) of its type.
NESTED = {
    "nats": ("services/runtime/src/settings.rs", "NatsSettings"),
    "limits": ("services/package/src/archive.rs", "ArchiveLimits"),
}


def struct_fields(path, name):
    """The `pub` field names of `pub struct NAME { … }` in a Rust file."""
    text = (ROOT / path).read_text()
    match = re.search(r"pub struct " + name + r"\s*\{(.*?)\n\}", text, re.S)
    if not match:
        raise SystemExit(f"{path}: no `pub struct {name}` (did the settings move?)")
    return set(re.findall(r"^\s*pub (\w+):", match.group(1), re.M))


class Problems(list):
    def add(self, where, what):
        self.append(f"{where}: {what}")


def check_keys(problems, where, table, path, struct, nested=NESTED):
    """Keys of a TOML table against a settings struct, recursing into known nested tables."""
    fields = struct_fields(path, struct)
    for key, value in table.items():
        if key not in fields:
            problems.add(where, f"unknown setting `{key}` (known: {', '.join(sorted(fields))})")
        elif key in nested and isinstance(value, dict):
            check_keys(problems, f"{where} [{key}]", value, *nested[key])


def check_settings_file(problems, where, toml_path, binary):
    settings_rs = SERVICES[binary][0]
    try:
        data = tomllib.loads(toml_path.read_text())
    except tomllib.TOMLDecodeError as e:
        problems.add(where, f"{toml_path.relative_to(ROOT)} does not parse: {e}")
        return
    check_keys(problems, where, data, settings_rs, "Settings")
    apps = data.get("apps")
    if binary == "fleetcast-agent" and isinstance(apps, list):
        for i, app in enumerate(apps):
            check_keys(problems, f"{where} apps[{i}]", app, settings_rs, "AppSettings", {
                "health": ("services/package/src/package_config.rs", "HealthGate"),
                "crash": ("services/agent/src/crash_policy.rs", "CrashPolicy"),
            })
    if binary == "fleetcast-tracker" and isinstance(apps, dict):
        for app, policy in apps.items():
            check_keys(problems, f"{where} apps.{app}", policy,
                       "services/tracker/src/policy.rs", "AppPolicy")
            for i, ring in enumerate(policy.get("rings", [])):
                check_keys(problems, f"{where} apps.{app}.rings[{i}]", ring,
                           "services/tracker/src/policy.rs", "RingPolicy")


def as_list(value):
    if value is None:
        return []
    return value.split() if isinstance(value, str) else list(value)


def check_compose(path, nats_dir=None):
    problems = Problems()
    base = path.resolve().parent
    doc = YAML(typ="safe", pure=True).load(path.read_text())
    services = doc.get("services") or {}
    volumes = set(doc.get("volumes") or {})
    networks = set(doc.get("networks") or {}) | {"default"}
    for name, svc in services.items():
        where = f"{path.name}: service {name}"
        depends = svc.get("depends_on") or {}
        for dep in depends if isinstance(depends, (list, dict)) else []:
            if dep not in services:
                problems.add(where, f"depends_on {dep}, which is not a service")
        nets = svc.get("networks") or {}
        for net in nets if isinstance(nets, (list, dict)) else []:
            if net not in networks:
                problems.add(where, f"network {net} is not declared")
        mounts = {}
        for vol in svc.get("volumes") or []:
            if isinstance(vol, str):
                parts = vol.split(":")
                source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
            else:
                source, target = vol.get("source"), vol.get("target")
            if source is None:
                continue
            if source.startswith((".", "/", "~")):
                host = (base / source).resolve() if source.startswith(".") else Path(source)
                if source.startswith(".") and not host.exists():
                    problems.add(where, f"bind mount source {source} does not exist")
                mounts[target] = host
            elif source not in volumes:
                problems.add(where, f"volume {source} is not declared under volumes:")

        command = as_list(svc.get("entrypoint")) + as_list(svc.get("command"))
        binary = next((c for c in command if c in SERVICES), None)
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
        fleetcast_image = str(svc.get("image", "")).startswith("fleetcast:")
        for var in env:
            # Other images (nats) may read FLEETCAST_* variables of their own.
            if not fleetcast_image or not var.startswith("FLEETCAST_") or var in GENERIC_VARIABLES:
                continue
            if binary is None:
                problems.add(where, f"{var}: this container runs no fleetcast service")
                continue
            prefix = f"FLEETCAST_{SERVICES[binary][1]}_"
            if not var.startswith(prefix):
                problems.add(where, f"{var} is not read by {binary} (its variables: {prefix}*)")
                continue
            keys = var[len(prefix):].lower().split("__")
            fields = struct_fields(SERVICES[binary][0], "Settings")
            if keys[0] not in fields:
                problems.add(where, f"{var}: {binary} has no setting `{keys[0]}`")
            elif len(keys) > 1:
                if keys[0] not in NESTED:
                    problems.add(where, f"{var}: `{keys[0]}` has no nested keys")
                elif keys[1] not in struct_fields(*NESTED[keys[0]]):
                    problems.add(where, f"{var}: `{keys[0]}` has no key `{keys[1]}`")
        if binary and "--config" in command:
            target = command[command.index("--config") + 1]
            host = mounts.get(target)
            if host is None:
                problems.add(where, f"--config {target} is not a bind-mounted file")
            elif host.is_file():
                check_settings_file(problems, where, host, binary)
    check_compose_exposure(problems, path, services, nats_dir)
    return problems


# ---------------------------------------------------------------------------------------------
# Exposure: no port open to the network without authentication and TLS.

LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|localhost|::1|\[::1\])$")
DEV_ONLY = "# check-deploy: development only"
TRUE = {"true", "1", "yes", "on"}


def nats_tokens(text):
    """nats-server's configuration format, enough for this check: comments dropped, strings,
    words, and the structure characters { } [ ] : = , ; as tokens."""
    tokens = []
    for line in text.splitlines():
        i = 0
        while i < len(line):
            c = line[i]
            if c in " \t\r":
                i += 1
            elif c == "#" or line.startswith("//", i):
                break
            elif c in "{}[]:=,;":
                tokens.append(c)
                i += 1
            elif c in "\"'":
                end = line.find(c, i + 1)
                end = len(line) if end < 0 else end
                tokens.append(line[i + 1:end])
                i = end + 1
            else:
                m = re.match(r"[^\s{}\[\],;=:]+(:[^\s{}\[\],;=:]+)*", line[i:])
                word = m.group(0) if m else line[i]
                # `listen: 0.0.0.0:4222` keeps its address whole; `key:` ends at the colon.
                if word.endswith(":"):
                    word = word[:-1]
                tokens.append(word)
                i += len(word)
        tokens.append("\n")
    return tokens


def nats_parse(path, nats_dir=None, seen=None):
    """A nats-server configuration file as nested dicts (blocks) and lists; includes are read
    in place, from the including file's folder (or, when missing there, from nats_dir)."""
    seen = seen or set()
    if path in seen:
        raise ValueError(f"{path}: include loop")
    seen = seen | {path}
    tokens = nats_tokens(path.read_text())
    pos = 0

    def skip_nl():
        nonlocal pos
        while pos < len(tokens) and tokens[pos] in ("\n", ",", ";"):
            pos += 1

    def value():
        nonlocal pos
        while pos < len(tokens) and tokens[pos] == "\n":
            pos += 1
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return block("}")
        if tok == "[":
            items = []
            while True:
                skip_nl()
                if tokens[pos] == "]":
                    pos += 1
                    return items
                items.append(value())
        return tok

    def block(close):
        nonlocal pos
        out = {}
        while True:
            skip_nl()
            if pos >= len(tokens):
                if close:
                    raise ValueError(f"{path}: unclosed block")
                return out
            key = tokens[pos]
            pos += 1
            if key == close:
                return out
            if key == "include":
                name = tokens[pos]
                pos += 1
                target = path.parent / name
                if not target.exists() and nats_dir is not None:
                    target = Path(nats_dir) / name
                if target.exists():
                    out.update(nats_parse(target, nats_dir, seen))
                else:
                    out.setdefault("__missing_includes__", []).append(name)
                continue
            if pos < len(tokens) and tokens[pos] in (":", "="):
                pos += 1
            out[key.lower()] = value()

    return block(None)


def host_port(conf, default_port):
    """(host, port) a block listens on: `listen` (host:port or :port), else host/port."""
    listen = conf.get("listen")
    host, port = conf.get("host", conf.get("net", "0.0.0.0")), conf.get("port", default_port)
    if isinstance(listen, str):
        if listen.count(":") >= 1 and not listen.startswith("["):
            h, _, p = listen.rpartition(":")
            host, port = (h or host), p
        elif listen.isdigit():
            port = listen
        else:
            host = listen
    return str(host), str(port)


def nats_listeners(conf):
    """Every listener of a server: (what, host, port, authenticated, tls)."""
    operator = "operator" in conf or "trusted_keys" in conf or "trusted" in conf
    accounts = conf.get("accounts")
    accounts_users = isinstance(accounts, dict) and any(
        isinstance(a, dict) and a.get("users") for a in accounts.values())
    authorization = isinstance(conf.get("authorization"), dict)
    client_auth = operator or accounts_users or authorization
    out = [("client", *host_port(conf, "4222"), client_auth, isinstance(conf.get("tls"), dict))]
    for name, port in (("cluster", "6222"), ("gateway", "7222"), ("leafnodes", "7422"),
                       ("websocket", "443"), ("mqtt", "1883")):
        block = conf.get(name)
        if not isinstance(block, dict):
            continue
        if "listen" not in block and "port" not in block:
            continue  # outbound only (a leaf node's remotes, a cluster without listen)
        tls = block.get("tls")
        tls_ok = isinstance(tls, dict)
        own_auth = isinstance(block.get("authorization"), dict)
        if name == "cluster":
            # Routes do not take accounts' users: their own authorization, or mutual TLS.
            auth = own_auth or (isinstance(tls, dict) and str(tls.get("verify")).lower() in TRUE)
        elif name == "gateway":
            auth = own_auth
        else:
            auth = own_auth or client_auth
        out.append((name, *host_port(block, port), auth, tls_ok))
    return out


def nats_exposure(path, nats_dir=None):
    """Problems of one server configuration: open listeners on non-loopback addresses."""
    problems = Problems()
    try:
        conf = nats_parse(path, nats_dir)
    except (ValueError, IndexError, OSError) as e:
        problems.add(path.name, f"cannot read: {e}")
        return problems, []
    for name in conf.get("__missing_includes__", []):
        problems.add(path.name, f"include {name} not found (run ops/nats/gen-accounts first, "
                                "or give --nats-dir)")
    listeners = nats_listeners(conf)
    dev_only = DEV_ONLY in path.read_text()
    if not dev_only:
        for what, host, port, auth, tls in listeners:
            if LOOPBACK.match(host):
                continue
            missing = [w for w, ok in (("authentication", auth), ("TLS", tls)) if not ok]
            if missing:
                problems.add(path.name, f"{what} listener on {host}:{port} without "
                                        f"{' and '.join(missing)}")
        http = conf.get("http") or conf.get("http_port") or conf.get("monitor_port")
        if http is not None:
            host = str(http).rpartition(":")[0] if ":" in str(http) else "0.0.0.0"
            if not LOOPBACK.match(host):
                problems.add(path.name, f"monitoring (http) on {http}: no authentication there, "
                                        "keep it on 127.0.0.1")
    return problems, listeners


def published(port):
    """(host_ip, container port) of a `ports:` entry."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "0.0.0.0")), str(port.get("target"))
    parts = str(port).split("/")[0].split(":")
    if len(parts) == 3:
        return parts[0], parts[2]
    if len(parts) == 2:
        return "0.0.0.0", parts[1]
    return "0.0.0.0", parts[0]


def check_compose_exposure(problems, path, services, nats_dir):
    base = path.resolve().parent
    insecure = []
    for name, svc in services.items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
        for var, value in env.items():
            if (var.endswith("NATS__INSECURE_DEV") or var == "FLEETCAST_NATS_INSECURE_DEV") \
                    and str(value).lower() in TRUE:
                insecure.append(name)
                break
    for name, svc in services.items():
        where = f"{path.name}: service {name}"
        ports = [published(p) for p in svc.get("ports") or []]
        open_ports = [(h, p) for h, p in ports if not LOOPBACK.match(h)]
        if insecure and open_ports:
            problems.add(where, f"publishes {', '.join(f'{h}:{p}' for h, p in open_ports)} "
                                f"beyond 127.0.0.1 in a file whose {', '.join(insecure)} "
                                "connect with insecure_dev")
        if not str(svc.get("image", "")).startswith("nats:"):
            continue
        command = as_list(svc.get("command"))
        if "-c" not in command and "--config" not in command:
            if open_ports:
                problems.add(where, "runs nats-server without a configuration file (no "
                                    "authentication) and publishes a port beyond 127.0.0.1")
            continue
        target = command[command.index("-c" if "-c" in command else "--config") + 1]
        conf = None
        for vol in svc.get("volumes") or []:
            parts = vol.split(":") if isinstance(vol, str) else [vol.get("source"),
                                                                   vol.get("target")]
            if len(parts) > 1 and parts[1] == target and str(parts[0]).startswith("."):
                conf = (base / parts[0]).resolve()
        if conf is None or not conf.is_file():
            problems.add(where, f"-c {target}: not a bind-mounted file of this repository")
            continue
        local = Path(nats_dir) / conf.name if nats_dir else conf
        file_problems, listeners = nats_exposure(local if local.is_file() else conf, nats_dir)
        dev_only = DEV_ONLY in conf.read_text()
        by_port = {port: (what, auth, tls) for what, _, port, auth, tls in listeners}
        for host, port in open_ports:
            what, auth, tls = by_port.get(port, ("monitoring" if port == "8222" else None,
                                                 False, False))
            if what is None:
                continue
            if dev_only or not (auth and tls):
                problems.add(where, f"publishes {what} port {port} on {host} to {conf.name}, "
                                    "which does not authenticate and encrypt it"
                                    + (" (a development-only configuration)" if dev_only else ""))
        for p in file_problems:
            problems.append(f"{where}: {p}")


def rust_metric_names():
    names = set()
    for rs in (ROOT / "services").rglob("*.rs"):
        names.update(re.findall(r'"(fleetcast_[a-z0-9_]+)"', rs.read_text()))
    return names


def check_grafana(path):
    problems = Problems()
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        problems.add(path.name, f"not JSON: {e}")
        return problems
    for key in ("title", "uid", "panels", "schemaVersion"):
        if key not in dash:
            problems.add(path.name, f"no `{key}`")
    variables = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    exported = rust_metric_names()
    ids = set()

    def walk(panels):
        for panel in panels:
            where = f"{path.name}: panel {panel.get('id')} {panel.get('title')!r}"
            if panel.get("id") in ids:
                problems.add(where, "duplicate panel id")
            ids.add(panel.get("id"))
            if "gridPos" not in panel:
                problems.add(where, "no gridPos")
            for target in panel.get("targets", []):
                expr = target.get("expr", "")
                for metric in re.findall(r"\bfleetcast_[a-z0-9_]+", expr):
                    base = re.sub(r"_(bucket|sum|count)$", "", metric)
                    if metric not in exported and base not in exported:
                        problems.add(where, f"{metric} is not exported by any fleetcast service")
            for ref in re.findall(r"\$\{?(\w+)", json.dumps(panel)):
                if ref not in variables and not ref.startswith("__"):
                    problems.add(where, f"uses ${ref}, which is not a dashboard variable")
            walk(panel.get("panels", []))

    walk(dash.get("panels", []))
    return problems


FIXTURES = ROOT / "ops" / "check-deploy-fixtures"


def selftest():
    """Each fixture must fail, with the problem its first line names (`# expect: TEXT`)."""
    failures = []
    fixtures = sorted(p for p in FIXTURES.iterdir() if p.suffix in (".conf", ".yml"))
    if not fixtures:
        failures.append(f"no fixtures in {FIXTURES}")
    for path in fixtures:
        expected = [line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                    if line.startswith("# expect:")]
        if not expected:
            failures.append(f"{path.name}: no `# expect:` line")
            continue
        problems = (check_compose(path, None) if path.suffix == ".yml"
                    else nats_exposure(path)[0])
        for text in expected:
            if not any(text in p for p in problems):
                failures.append(f"{path.name}: expected a problem with {text!r}, got "
                                f"{list(problems) or 'none'}")
    for f in failures:
        print(f)
    print(f"selftest: {len(fixtures)} bad fixture(s), {len(failures)} not caught")
    return 1 if failures else 0


def main(argv):
    if len(argv) >= 2 and argv[1] == "selftest":
        return selftest()
    if len(argv) < 3 or argv[1] not in ("compose", "nats", "grafana"):
        raise SystemExit(__doc__)
    args = argv[2:]
    nats_dir = None
    if args[:1] == ["--nats-dir"]:
        nats_dir, args = args[1], args[2:]
    if argv[1] == "compose":
        problems = [p for f in args for p in check_compose(Path(f), nats_dir)]
    elif argv[1] == "nats":
        problems = [p for f in args for p in nats_exposure(Path(f), nats_dir)[0]]
    else:
        problems = [p for f in args for p in check_grafana(Path(f))]
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
