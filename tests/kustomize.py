"""A renderer for the subset of kustomize that deploy/k8s uses, so its tests need no kubectl.

Debian 12 packages no kubectl, and PyPI has no kustomize, so CI renders with this; where
``kubectl`` is installed, ``tests/test_k8s.py`` checks that both render the same objects.
Supported: ``resources`` (files and directories), ``namespace``, ``nameSuffix`` (with the name
references deploy/k8s has: ConfigMap refs, HPA targets), ``labels`` (``pairs``,
``includeSelectors``), ``images`` (``newName``, ``newTag``) and ``patches`` given as a
``path`` to a strategic merge patch (lists merged by their Kubernetes merge key, items
removed with ``$patch: delete``). Anything else in a kustomization is refused, so the subset
cannot silently drift from what the files use.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "nameSuffix", "labels", "images",
             "patches"}  # fmt: skip
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "envFrom": None, "volumeMounts": "mountPath", "ports": "containerPort"}  # fmt: skip


def render(folder: Path) -> list[Obj]:
    """The objects ``kubectl kustomize folder`` would print."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise ValueError(f"{folder}: kustomize fields outside the supported subset: {unknown}")
    objects: list[Obj] = []
    for entry in spec.get("resources", ()):
        path = folder / entry
        if path.is_dir():
            objects += render(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", ()):
        if set(patch) != {"path"}:
            raise ValueError(f"{folder}: only `patches: - path:` is supported, not {patch}")
        change = yaml.safe_load((folder / patch["path"]).read_text())
        (target,) = [o for o in objects if _id(o) == _id(change)]
        target.update(_merge(target, change))
    for image in spec.get("images", ()):
        for obj in objects:
            for container in _containers(obj):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    for label in spec.get("labels", ()):
        for obj in objects:
            _add_labels(obj, label["pairs"], label.get("includeSelectors", False))
    if "nameSuffix" in spec:
        _suffix(objects, spec["nameSuffix"])
    if "namespace" in spec:
        for obj in objects:
            obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def _id(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _merge(base: Any, patch: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v, k) if k in base else _clean(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and MERGE_KEYS.get(key):
        merge_key = MERGE_KEYS[key]
        out_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            matches = [i for i, b in enumerate(out_list) if b.get(merge_key) == item[merge_key]]
            if item.get("$patch") == "delete":
                out_list = [b for i, b in enumerate(out_list) if i not in matches]
            elif matches:
                out_list[matches[0]] = _merge(out_list[matches[0]], item)
            else:
                # strategic merge puts items the base lacks first, in the patch's order
                out_list.insert(sum(1 for p in patch[: patch.index(item)] if p), _clean(item))
        return out_list
    return _clean(patch)


def _clean(value: Any) -> Any:
    return copy.deepcopy(value)


def _containers(obj: Obj) -> list[Obj]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", ()), *pod.get("containers", ())]


def _add_labels(obj: Obj, pairs: dict[str, str], selectors: bool) -> None:
    obj["metadata"].setdefault("labels", {}).update(pairs)
    if not selectors:
        return
    spec = obj.get("spec", {})
    if obj["kind"] == "Service":
        spec.setdefault("selector", {}).update(pairs)
    elif obj["kind"] in ("Deployment", "PodDisruptionBudget"):
        spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)
    if obj["kind"] == "Deployment":
        spec["template"]["metadata"].setdefault("labels", {}).update(pairs)


def _suffix(objects: list[Obj], suffix: str) -> None:
    renamed = {_id(o): _id(o)[1] + suffix for o in objects}
    for obj in objects:
        obj["metadata"]["name"] = renamed[_id(obj)]

    def config_map(name: str) -> str:
        return renamed.get(("ConfigMap", name), name)

    for obj in objects:
        if obj["kind"] == "HorizontalPodAutoscaler":
            ref = obj["spec"]["scaleTargetRef"]
            ref["name"] = renamed.get((ref["kind"], ref["name"]), ref["name"])
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for volume in pod.get("volumes", ()):
            if "configMap" in volume:
                volume["configMap"]["name"] = config_map(volume["configMap"]["name"])
        for container in _containers(obj):
            for source in container.get("envFrom", ()):
                if "configMapRef" in source:
                    source["configMapRef"]["name"] = config_map(source["configMapRef"]["name"])
            for env in container.get("env", ()):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    ref["name"] = config_map(ref["name"])
