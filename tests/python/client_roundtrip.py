"""The Python `kubernetes` client against a running skiff server: list,
create, patch, watch and delete, as a user's script would. Exits non-zero
with a message on the first broken expectation."""

import sys
import threading

from kubernetes import client, config, watch


def main(kubeconfig: str) -> None:
    config.load_kube_config(config_file=kubeconfig)
    core = client.CoreV1Api()
    apps = client.AppsV1Api()

    names = [ns.metadata.name for ns in core.list_namespace().items]
    assert "kube-system" in names, names

    seen = []
    start_rv = core.list_namespaced_config_map("default").metadata.resource_version

    def watch_configmaps():
        w = watch.Watch()
        for event in w.stream(core.list_namespaced_config_map, "default",
                              resource_version=start_rv, timeout_seconds=20):
            seen.append((event["type"], event["object"].metadata.name))
            if event["type"] == "DELETED":
                w.stop()

    watcher = threading.Thread(target=watch_configmaps)
    watcher.start()

    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="py"), data={"k": "v"})
    created = core.create_namespaced_config_map("default", body)
    assert created.metadata.uid, created

    patched = core.patch_namespaced_config_map("py", "default", {"data": {"k": "w", "n": "1"}})
    assert patched.data == {"k": "w", "n": "1"}, patched.data

    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="py-web"),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels={"app": "py"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "py"}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
            ),
        ),
    )
    apps.create_namespaced_deployment("default", deployment)
    scaled = apps.patch_namespaced_deployment_scale("py-web", "default", {"spec": {"replicas": 4}})
    assert scaled.spec.replicas == 4, scaled

    try:
        core.read_namespaced_config_map("missing", "default")
        raise AssertionError("reading a missing object succeeded")
    except client.exceptions.ApiException as e:
        assert e.status == 404, e.status

    core.delete_namespaced_config_map("py", "default")
    apps.delete_namespaced_deployment("py-web", "default")
    watcher.join(timeout=25)
    assert ("ADDED", "py") in seen and ("MODIFIED", "py") in seen and ("DELETED", "py") in seen, seen
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
