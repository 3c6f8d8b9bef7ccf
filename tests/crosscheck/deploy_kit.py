#!/usr/bin/env python3
"""Checks the deployment kit in deploy/ against itself and against the binary.

Every Kubernetes manifest is parsed (PyYAML), and the references between them are
checked: Service target ports name container ports; probes hit /healthz and /readyz on
the HTTP port; every volumeMount has a volume; the PostgreSQL link is `verify-full` with a
CA from a mounted Secret; the ConfigMap items the Deployment mounts
exist; the Workload API socket the config names lives on the SPIFFE CSI volume; the
config's listen ports are the container ports; the PodDisruptionBudget, NetworkPolicy,
Service and ClusterSPIFFEID select the Deployment's pods; the ClusterSPIFFEID gives the
broker the SPIFFE ID clients pin by default; secrets are mounted read-only, 0400. Then the
ConfigMap's config.toml and policy files are written out and loaded by the broker binary
itself (`spiffe-broker policy check`): the binary refuses unknown keys, so a key it does
not read fails here. The credential-helper sidecar (sidecar-agent.yaml) is checked the same way: a native
sidecar sharing an in-memory emptyDir (read-only in the workload), its identity from the
CSI volume, probes on its health port, the broker pinned by SPIFFE ID and dialled by a
Service name its SVID carries, and its helper.toml loaded by `spiffe-broker agent --check`
(an unwritable path refused). The container file and the systemd unit are checked for their
invariants (non-root, no shell at run time; hardening options; the config path).

Usage:  python3 tests/crosscheck/deploy_kit.py      (SPIFFE_BROKER_BIN as in crosscheck.py)
The last line is `N passed, M failed`; the exit code is non-zero on any failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "deploy"
BIN = os.environ.get("SPIFFE_BROKER_BIN", str(REPO / "target/debug/spiffe-broker"))
BROKER_ID = "spiffe://example.org/spiffe-broker"

passed = failed = 0


def check(name: str, ok: bool, detail: str = "") -> None:
    global passed, failed
    if ok:
        passed += 1
        print(f"  PASS  {name}")
    else:
        failed += 1
        print(f"  FAIL  {name}  {detail}")


def load_manifests() -> dict[tuple[str, str], dict]:
    objs = {}
    for f in sorted((KIT / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc:
                continue
            check(f"{f.name}: {doc.get('kind')} parses with apiVersion/kind/metadata",
                  all(k in doc for k in ("apiVersion", "kind")) and
                  (doc["kind"] == "AuthenticationConfiguration" or "metadata" in doc))
            if "metadata" in doc:
                objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def main() -> int:
    print("[manifests]")
    objs = load_manifests()
    dep = objs.get(("Deployment", "spiffe-broker"))
    check("a Deployment spiffe-broker", dep is not None)
    if dep is None:
        print(f"{passed} passed, {failed} failed")
        return 1
    spec = dep["spec"]
    pod = spec["template"]
    pod_labels = pod["metadata"]["labels"]
    check("Deployment selector matches its pod labels",
          labels_match(spec["selector"]["matchLabels"], pod_labels))
    check("several replicas", spec.get("replicas", 1) >= 2, str(spec.get("replicas")))
    check("rolling update never drops below the replica count",
          spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0)
    psec = pod["spec"]["securityContext"]
    check("pod runs as non-root", psec.get("runAsNonRoot") is True and psec.get("runAsUser", 0) != 0)
    (c,) = [c for c in pod["spec"]["containers"] if c["name"] == "spiffe-broker"]
    csec = c["securityContext"]
    check("container: read-only root, no privilege escalation, no capabilities",
          csec.get("readOnlyRootFilesystem") is True and csec.get("allowPrivilegeEscalation") is False
          and csec.get("capabilities", {}).get("drop") == ["ALL"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check("container ports grpc and http", set(ports) == {"grpc", "http"}, str(ports))
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        p = c.get(probe, {}).get("httpGet", {})
        check(f"{probe} GET {path} on the http port", p.get("path") == path and p.get("port") in ("http", ports["http"]), str(p))
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    check("every volumeMount has a volume", set(mounts) <= set(volumes), str(set(mounts) - set(volumes)))
    check("every volume is mounted", set(volumes) <= set(mounts), str(set(volumes) - set(mounts)))
    csi = [n for n, v in volumes.items() if v.get("csi", {}).get("driver") == "csi.spiffe.io"]
    check("the Workload API comes from the SPIFFE CSI driver (csi.spiffe.io), read-only",
          len(csi) == 1 and volumes[csi[0]]["csi"].get("readOnly") is True and mounts[csi[0]].get("readOnly") is True)
    for n, v in volumes.items():
        if "secret" in v:
            check(f"secret volume {n} is read-only with mode 0400",
                  mounts[n].get("readOnly") is True and v["secret"].get("defaultMode") == 0o400)
    cm_vol = [v for v in volumes.values() if "configMap" in v]
    check("one ConfigMap volume", len(cm_vol) == 1)
    cm_name = cm_vol[0]["configMap"]["name"]
    cm = objs.get(("ConfigMap", cm_name))
    check(f"ConfigMap {cm_name} exists", cm is not None)
    items = cm_vol[0]["configMap"].get("items", [])
    check("every mounted ConfigMap key exists", all(i["key"] in cm["data"] for i in items),
          str([i["key"] for i in items]))
    config_mount = mounts[[n for n, v in volumes.items() if "configMap" in v][0]]["mountPath"]
    check("the container runs `serve --config` on the mounted config.toml",
          c.get("args") == ["serve", "--config", f"{config_mount}/config.toml"], str(c.get("args")))

    print("[config.toml inside the ConfigMap]")
    text = cm["data"]["config.toml"]
    def value(key: str) -> str:
        m = re.search(rf'^{re.escape(key)}\s*=\s*"([^"]*)"', text, re.M)
        return m.group(1) if m else ""
    grpc_port = int(value("grpc_addr").rsplit(":", 1)[1])
    http_port = int(value("http_addr").rsplit(":", 1)[1])
    check("grpc_addr port is the grpc container port", grpc_port == ports["grpc"], f"{grpc_port} vs {ports['grpc']}")
    check("http_addr port is the http container port", http_port == ports["http"], f"{http_port} vs {ports['http']}")
    sock = value("workload_api_socket")
    check("workload_api_socket lives on the CSI volume",
          sock.startswith("unix://" + mounts[csi[0]]["mountPath"] + "/"), sock)
    state_dir = value("state_dir")
    keys = [n for n, m in mounts.items() if m["mountPath"] == f"{state_dir}/keys"]
    check("the shared signing keys are a Secret mounted at STATE_DIR/keys",
          len(keys) == 1 and "secret" in volumes[keys[0]], str(keys))
    check("the PostgreSQL link is TLS with the server authenticated (postgres_sslmode = verify-full)",
          value("postgres_sslmode") == "verify-full", value("postgres_sslmode"))
    ca_mount = [n for n, m in mounts.items() if value("postgres_ca_file").startswith(m["mountPath"] + "/")]
    check("the PostgreSQL CA comes from a Secret volume",
          len(ca_mount) == 1 and "secret" in volumes[ca_mount[0]], str(ca_mount))
    for key in ("postgres_url_file", "postgres_ca_file", "cert", "key"):
        path = value(key)
        owner = [m["mountPath"] for m in mounts.values() if path.startswith(m["mountPath"] + "/")]
        check(f"{key} = {path} is on a mounted volume", bool(path) and bool(owner))
    check("the ConfigMap's schema is the project's schema",
          cm["data"]["schema.cedarschema"] == (REPO / "policy/schema.cedarschema").read_text())
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for i in items:
            target = root / i["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(cm["data"][i["key"]])
        out = subprocess.run([BIN, "policy", "check", "--config", str(root / "config.toml")],
                             capture_output=True, text=True, timeout=60)
        check("the broker binary loads the ConfigMap's config and policy (policy check)",
              out.returncode == 0, out.stderr.strip() or out.stdout.strip())

    print("[objects that select the broker's pods]")
    svc = objs.get(("Service", "spiffe-broker"))
    check("Service selects the pods", svc is not None and labels_match(svc["spec"]["selector"], pod_labels))
    for p in svc["spec"]["ports"]:
        check(f"Service port {p['name']} targets a container port",
              p["targetPort"] in ports or p["targetPort"] in ports.values())
    pdb = objs.get(("PodDisruptionBudget", "spiffe-broker"))
    check("PodDisruptionBudget selects the pods and leaves fewer than all replicas as its minimum",
          pdb is not None and labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
          and 0 < pdb["spec"]["minAvailable"] < spec["replicas"])
    np = objs.get(("NetworkPolicy", "spiffe-broker"))
    check("NetworkPolicy selects the pods", np is not None and labels_match(np["spec"]["podSelector"]["matchLabels"], pod_labels))
    ingress_ports = {p["port"] for r in np["spec"]["ingress"] for p in r.get("ports", [])}
    check("NetworkPolicy admits exactly the grpc and http ports", ingress_ports == set(ports) or ingress_ports == set(ports.values()), str(ingress_ports))
    sid = objs.get(("ClusterSPIFFEID", "spiffe-broker"))
    check("ClusterSPIFFEID selects the pods", sid is not None and labels_match(sid["spec"]["podSelector"]["matchLabels"], pod_labels))
    ns = dep["metadata"]["namespace"]
    check("ClusterSPIFFEID selects the broker's namespace",
          sid["spec"]["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name") == ns)
    check("ClusterSPIFFEID yields the SPIFFE ID clients pin by default",
          sid["spec"]["spiffeIDTemplate"].replace("{{ .TrustDomain }}", "example.org") == BROKER_ID)
    sa = pod["spec"].get("serviceAccountName")
    check("the pod's ServiceAccount is in the kit", ("ServiceAccount", sa) in objs)

    print("[the credential helper as a sidecar (sidecar-agent.yaml)]")
    check_sidecar(objs, sid)

    print("[Containerfile]")
    cf = (KIT / "Containerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", cf, re.M)
    check("multi-stage build", len(stages) >= 2, str(stages))
    check("final stage has no shell (distroless)", "distroless" in stages[-1], stages[-1])
    user = re.findall(r"^USER\s+(\S+)", cf, re.M)
    check("runs as a numeric non-root user", bool(user) and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0", str(user))
    check("the user is the one the pod runs as", bool(user) and int(user[-1].split(":")[0]) == psec["runAsUser"])
    expose = {int(p) for p in re.findall(r"^EXPOSE\s+(.+)$", cf, re.M)[0].split()}
    check("EXPOSE lists the container ports", expose == set(ports.values()), str(expose))
    check("exec-form ENTRYPOINT (no shell)", re.search(r'^ENTRYPOINT\s+\[', cf, re.M) is not None)

    print("[systemd unit]")
    unit = (KIT / "systemd/spiffe-broker.service").read_text()
    opts: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            opts.setdefault(k.strip(), []).append(v.strip())
    check("ExecStart runs `serve --config`", re.match(r"\S+/spiffe-broker serve --config \S+\.toml$", opts.get("ExecStart", [""])[0]) is not None)
    for k, v in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                 ("DynamicUser", "yes"), ("MemoryDenyWriteExecute", "yes"), ("RestrictSUIDSGID", "yes")):
        check(f"hardening {k}={v}", v in opts.get(k, []))
    check("ExecReload sends SIGHUP (policy reload)", "-HUP" in opts.get("ExecReload", [""])[0])
    check("empty capability bounding set", opts.get("CapabilityBoundingSet") == [""])
    check("the state directory is writable and private",
          opts.get("StateDirectory") == ["spiffe-broker"] and opts.get("StateDirectoryMode") == ["0700"])

    print("[SPIRE entries and registry config]")
    entries = (KIT / "spire/registration-entries.sh").read_text()
    for ident in ("spiffe-broker", "ci/deploy-agent", "ml/model-runtime", "gpu/provisioner", "ops/root"):
        check(f"registration entry for {ident}", f"entry {ident} " in entries)
    reg = yaml.safe_load((KIT / "registry/config.yml").read_text())
    tok = reg["auth"]["token"]
    check("registry trusts the broker: issuer == issuer_url", tok["issuer"] == value("issuer_url"), tok["issuer"])
    check("registry service is the registry profiles' audience",
          f'audience = "{tok["service"]}"' in text)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def check_sidecar(objs: dict, broker_sid: dict) -> None:
    app = objs.get(("Deployment", "model-runtime"))
    check("a workload Deployment with the helper beside it", app is not None)
    if app is None:
        return
    pod = app["spec"]["template"]
    helpers = [c for c in pod["spec"].get("initContainers", []) if "agent" in c.get("args", [])]
    check("the helper is a native sidecar (init container, restartPolicy Always)",
          len(helpers) == 1 and helpers[0].get("restartPolicy") == "Always")
    if not helpers:
        return
    h = helpers[0]
    (workload,) = pod["spec"]["containers"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    hm = {m["name"]: m for m in h["volumeMounts"]}
    wm = {m["name"]: m for m in workload["volumeMounts"]}
    check("every mount of both containers has a volume", set(hm) | set(wm) <= set(volumes))
    shared = [n for n in hm if n in wm and "emptyDir" in volumes[n]]
    check("one in-memory emptyDir shared by helper and workload",
          len(shared) == 1 and volumes[shared[0]]["emptyDir"].get("medium") == "Memory", str(shared))
    if len(shared) != 1:
        return
    cred_dir = hm[shared[0]]["mountPath"]
    check("the workload mounts the credentials read-only at the same path",
          wm[shared[0]].get("readOnly") is True and wm[shared[0]]["mountPath"] == cred_dir)
    check("the helper's root filesystem is read-only, no privilege escalation",
          h["securityContext"].get("readOnlyRootFilesystem") is True
          and h["securityContext"].get("allowPrivilegeEscalation") is False)
    csi = [n for n, v in volumes.items() if v.get("csi", {}).get("driver") == "csi.spiffe.io"]
    check("the helper's identity comes from the SPIFFE CSI volume, read-only",
          len(csi) == 1 and hm.get(csi[0], {}).get("readOnly") is True)
    (cm_vol,) = [n for n in hm if "configMap" in volumes[n]]
    cm = objs.get(("ConfigMap", volumes[cm_vol]["configMap"]["name"]))
    args = h["args"]
    check("the helper runs `agent --config` on the mounted helper.toml",
          args[:2] == ["agent", "--config"] and args[2] == f"{hm[cm_vol]['mountPath']}/helper.toml", str(args))
    text = cm["data"]["helper.toml"]
    def value(key: str) -> str:
        m = re.search(rf'^{re.escape(key)}\s*=\s*"([^"]*)"', text, re.M)
        return m.group(1) if m else ""
    check("the helper pins the broker's SPIFFE ID", value("broker_id") == BROKER_ID)
    host, port = value("broker").rsplit(":", 1)
    svc = objs[("Service", "spiffe-broker")]
    check("the helper reaches the broker's Service on its grpc port",
          host.split(".")[:2] == [svc["metadata"]["name"], svc["metadata"]["namespace"]]
          and int(port) in [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"], value("broker"))
    check("the broker's SVID carries the Service name the helper dials (stock clients too)",
          host in broker_sid["spec"].get("dnsNameTemplates", []), host)
    check("the helper's Workload API socket is on the CSI volume",
          value("workload_api").startswith("unix://" + hm[csi[0]]["mountPath"] + "/"))
    paths = re.findall(r'^path\s*=\s*"([^"]*)"', text, re.M)
    check("every credential is written into the shared volume",
          bool(paths) and all(p.startswith(cred_dir + "/") for p in paths), str(paths))
    health_port = int(value("health_addr").rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in h["ports"]}
    for probe, path in (("startupProbe", "/ready"), ("livenessProbe", "/live"), ("readinessProbe", "/ready")):
        p = h.get(probe, {}).get("httpGet", {})
        check(f"helper {probe} GET {path} on its health port",
              p.get("path") == path and ports.get(p.get("port"), p.get("port")) == health_port, str(p))
    wsid = [o for (k, _), o in objs.items() if k == "ClusterSPIFFEID"
            and labels_match(o["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])]
    check("a ClusterSPIFFEID gives the workload's pods their SPIFFE ID", len(wsid) == 1)
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "helper.toml"
        cfg.write_text(text.replace(cred_dir + "/", d + "/"))
        out = subprocess.run([BIN, "agent", "--config", str(cfg), "--check"],
                             capture_output=True, text=True, timeout=60)
        check("the binary loads the helper's config (agent --check)",
              out.returncode == 0, out.stderr.strip() or out.stdout.strip())
        bad = Path(d) / "bad.toml"
        bad.write_text(text.replace(cred_dir + "/", d + "/missing/"))
        out = subprocess.run([BIN, "agent", "--config", str(bad), "--check"],
                             capture_output=True, text=True, timeout=60)
        check("an unwritable credential path is refused by agent --check",
              out.returncode != 0 and "missing" in out.stderr, out.stderr.strip())


if __name__ == "__main__":
    sys.exit(main())
