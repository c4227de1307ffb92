#!/usr/bin/env python3
"""Capture real kubectl protobuf request bodies as test fixtures for the decoder.

Runs a tiny HTTP server on 127.0.0.1 that answers kubectl's discovery and records
every POST body, then runs each kubectl command below twice: once against the
server (the protobuf body is saved as NAME.pb) and once with `--dry-run=client -o json`
(what kubectl would send as JSON, saved as NAME.json). The recorded POST is refused
with 409 so kubectl exits; the body is all we want.

Usage: capture_fixtures.py [KUBECTL]   (default: kubectl on PATH)
Writes to controlplane/src/apiserver/protobuf/testdata/.
"""

import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "controlplane/src/apiserver/protobuf/testdata")

# name -> kubectl arguments
COMMANDS = {
    "configmap": ["create", "configmap", "app-config", "--from-literal=greeting=hello", "--from-literal=empty="],
    "secret": ["create", "secret", "generic", "db-creds", "--from-literal=user=admin", "--from-literal=password=s3cr3t!"],
    "namespace": ["create", "namespace", "team-a"],
    "deployment": ["create", "deployment", "web", "--image=nginx", "--replicas=2", "--port=80"],
    "service": ["create", "service", "clusterip", "web", "--tcp=80:8080", "--tcp=443:https"],
    "quota": ["create", "quota", "compute", "--hard=cpu=1500m,memory=2Gi,pods=10"],
    "pdb": ["create", "poddisruptionbudget", "web", "--selector=app=web", "--min-available=50%"],
    "cronjob": ["create", "cronjob", "nightly", "--image=busybox", "--schedule=0 3 * * *", "--", "echo", "hi"],
    "clusterrole": ["create", "clusterrole", "reader", "--verb=get,list", "--resource=pods,services"],
    "ingress": ["create", "ingress", "web", "--rule=example.com/api*=web:80,tls=web-tls"],
    "job": ["create", "job", "once", "--image=busybox", "--", "date"],
}

GROUPS = {
    "apps/v1": ["deployments:Deployment"],
    "batch/v1": ["cronjobs:CronJob", "jobs:Job"],
    "policy/v1": ["poddisruptionbudgets:PodDisruptionBudget"],
    "rbac.authorization.k8s.io/v1": ["clusterroles:ClusterRole"],
    "networking.k8s.io/v1": ["ingresses:Ingress"],
}
CORE = ["configmaps:ConfigMap", "secrets:Secret", "namespaces:Namespace:cluster", "services:Service",
        "resourcequotas:ResourceQuota", "pods:Pod"]


def resource_list(group_version, resources):
    out = []
    for r in resources:
        name, kind, *scope = r.split(":")
        out.append({"name": name, "singularName": "", "namespaced": not scope, "kind": kind,
                    "verbs": ["create", "get", "list"]})
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": out}


def discovery(path):
    if path == "/version":
        return {"major": "1", "minor": "33", "gitVersion": "v1.33.0"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"]}
    if path == "/api/v1":
        return resource_list("v1", CORE)
    if path == "/apis":
        groups = []
        for gv in GROUPS:
            group, version = gv.split("/")
            entry = {"groupVersion": gv, "version": version}
            groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    gv = path.removeprefix("/apis/")
    if gv in GROUPS:
        return resource_list(gv, GROUPS[gv])
    return None


class Recorder(http.server.BaseHTTPRequestHandler):
    bodies = []

    def reply(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        obj = discovery(self.path.split("?")[0])
        if obj is None:
            self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
        else:
            self.reply(200, obj)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Recorder.bodies.append((self.headers.get("Content-Type"), body))
        self.reply(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                         "message": "recorded", "code": 409})

    def log_message(self, *args):
        pass


def main():
    kubectl = sys.argv[1] if len(sys.argv) > 1 else "kubectl"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = os.path.join(tmp, "config")
        with open(kubeconfig, "w") as f:
            json.dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "rec",
                "clusters": [{"name": "rec", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
                "contexts": [{"name": "rec", "context": {"cluster": "rec", "user": "rec", "namespace": "default"}}],
                "users": [{"name": "rec", "user": {"token": "recorder"}}],
            }, f)
        env = dict(os.environ, KUBECONFIG=kubeconfig)
        for name, args in COMMANDS.items():
            Recorder.bodies.clear()
            subprocess.run([kubectl, *args], env=env, capture_output=True)
            posts = [b for ct, b in Recorder.bodies if ct == "application/vnd.kubernetes.protobuf"]
            if not posts:
                print(f"{name}: kubectl sent no protobuf body ({[ct for ct, _ in Recorder.bodies]})")
                continue
            as_json = subprocess.run([kubectl, args[0], "--dry-run=client", "-o", "json", *args[1:]],
                                     env=env, capture_output=True, check=True).stdout
            with open(os.path.join(OUT, f"{name}.pb"), "wb") as f:
                f.write(posts[-1])
            with open(os.path.join(OUT, f"{name}.json"), "wb") as f:
                f.write(as_json)
            print(f"{name}: {len(posts[-1])} bytes")
    server.shutdown()


if __name__ == "__main__":
    main()
