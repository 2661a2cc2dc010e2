#!/usr/bin/env python3
"""The checks of ops/check-deploy that need to read files rather than run a linter.

  check-deploy.py compose FILE...   what the Compose Specification's schema cannot see
  check-deploy.py grafana FILE...   Grafana dashboards against the metrics the code exports

compose: every named volume, network and depends_on target is declared; every bind-mounted
file or folder exists; every FLEETCAST_<SERVICE>_<KEY> variable given to a fleetcast service
names a setting that service has (the settings structs reject unknown keys, so a misspelt
variable is a container that never starts); every TOML file passed with --config parses and
holds only known keys. The known keys are read from the settings structs in services/.

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
GENERIC_VARIABLES = {"FLEETCAST_LOG_FORMAT", "FLEETCAST_NATS_URL", "FLEETCAST_PUBLISHED_BY"}

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


def check_compose(path):
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
    return problems


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


def main(argv):
    if len(argv) < 3 or argv[1] not in ("compose", "grafana"):
        raise SystemExit(__doc__)
    check = check_compose if argv[1] == "compose" else check_grafana
    problems = [p for f in argv[2:] for p in check(Path(f))]
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
