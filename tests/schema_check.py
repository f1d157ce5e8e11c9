#!/usr/bin/env python3
"""Validates PortcullisPolicy and PortcullisClusterPolicy manifests against their CRDs, offline.

    python3 tests/schema_check.py deploy/crds.yaml deploy/policy.yaml deploy/examples/*.yaml

Every document of the manifest files is checked against the `openAPIV3Schema` of the version of
the CustomResourceDefinition (from the first file) that its `apiVersion` and `kind` name, as the
API server checks an object under strict field validation (kubectl's default):

- a field the schema does not declare is an error (the API server's strict decoding refuses
  what pruning would drop): every object schema is closed (`additionalProperties: false`) unless
  it declares `additionalProperties` itself or `x-kubernetes-preserve-unknown-fields`. Schemas
  under `allOf`/`anyOf`/`oneOf`/`not` are left open: in a structural schema those only add
  constraints to fields declared outside them;
- `nullable: true` allows null; `x-kubernetes-int-or-string` allows an integer or a string;
- the root also takes `apiVersion`, `kind` and `metadata` (the ObjectMeta fields a manifest can
  carry, closed as well); `metadata.name` is required and must be a DNS subdomain, and
  `metadata.namespace` (a DNS label) is an error on a cluster-scoped kind;
- `apiVersion` must be `<group>/<version>` of a served version (`portcullis.dev/v1alpha1`);
- a mapping with a key twice is an error (strict decoding refuses duplicate fields), and YAML
  is read as YAML 1.1, as kubectl does: unquoted `off`, `on`, `yes` and `no` are booleans.

What a schema cannot catch (a pattern that is not a SPIFFE ID, a destination outside the
object's namespace, settings outside the object named `default`...) the issuer checks:
`portcullis check-policy FILE` runs both.

Prints one line per document, `FILE: Kind/name passed` or `FILE: Kind/name: PATH: MESSAGE`
(every error of the document, `; `-separated, PATH as `spec.rules[0].from`), and exits 1 if any
document failed or is of a kind the definitions do not define, 2 on a usage error or unusable
definitions, 3 when PyYAML or jsonschema is missing (scripts/bootstrap.sh installs them).
"""

import copy
import json
import re
import sys

try:
    import jsonschema
    import yaml
except ImportError as e:  # pragma: no cover
    print(
        "schema_check.py needs PyYAML and jsonschema: %s "
        "(scripts/bootstrap.sh installs them: python3 -m pip install pyyaml jsonschema)" % e,
        file=sys.stderr,
    )
    sys.exit(3)

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The ObjectMeta fields, for `metadata` (what the API server decodes; anything else is unknown).
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
        "selfLink": {"type": "string"},
    },
    "additionalProperties": False,
}


class Loader(yaml.SafeLoader):
    """YAML 1.1 as kubectl reads it, but timestamps stay strings (JSON has no dates) and a key
    given twice in one mapping is an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, "duplicate field %s" % json.dumps(str(key)), key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=Loader) if d is not None]


def as_api_server(schema, closed=True):
    """The schema with Kubernetes' extensions turned into JSON Schema (see the module doc)."""
    if isinstance(schema, list):
        return [as_api_server(s, closed) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: as_api_server(s, True) for name, s in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = as_api_server(value, True) if isinstance(value, (dict, list)) else value
        elif key in ("allOf", "anyOf", "oneOf", "not"):
            out[key] = as_api_server(value, False)
        else:
            out[key] = value
    nullable = out.pop("nullable", False)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    if nullable:
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
        elif isinstance(t, list) and "null" not in t:
            out["type"] = t + ["null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = list(out["enum"]) + [None]
    is_object = out.get("type") == "object" or (
        isinstance(out.get("type"), list) and "object" in out["type"]
    )
    if (
        closed
        and (is_object or "properties" in out)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def definitions(path):
    """(group/version, kind) -> (validator, scope) for every served version of every CRD."""
    out = {}
    for d in load_all(path):
        if not isinstance(d, dict) or d.get("kind") != "CustomResourceDefinition":
            continue
        spec = d.get("spec") or {}
        group, kind, scope = spec.get("group"), (spec.get("names") or {}).get("kind"), spec.get("scope")
        for v in spec.get("versions") or []:
            if not v.get("served", True):
                continue
            schema = ((v.get("schema") or {}).get("openAPIV3Schema"))
            if not isinstance(schema, dict):
                raise ValueError("%s: version %s of %s has no openAPIV3Schema" % (path, v.get("name"), kind))
            schema = as_api_server(schema)
            schema.setdefault("properties", {})
            schema["properties"]["apiVersion"] = {"type": "string"}
            schema["properties"]["kind"] = {"type": "string"}
            meta = copy.deepcopy(OBJECT_META)
            if scope != "Namespaced":
                del meta["properties"]["namespace"]
            schema["properties"]["metadata"] = meta
            schema["required"] = sorted(set(schema.get("required", [])) | {"metadata"})
            schema["type"] = "object"
            schema["additionalProperties"] = False
            jsonschema.Draft4Validator.check_schema(schema)
            out[("%s/%s" % (group, v["name"]), kind)] = (jsonschema.Draft4Validator(schema), scope)
    if not out:
        raise ValueError("%s holds no CustomResourceDefinition with a served version" % path)
    return out


def path_of(parts):
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += "[%d]" % p
        elif IDENT.match(str(p)):
            out += ("." if out else "") + str(p)
        else:
            out += "[%s]" % json.dumps(str(p))
    return out or "(root)"


def show(v):
    return json.dumps(v)


def errors_of(error):
    """(path, message) for one jsonschema error, as the API server words it."""
    at = list(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        declared = set((error.schema.get("properties") or {}).keys())
        patterns = [re.compile(p) for p in (error.schema.get("patternProperties") or {})]
        extra = [
            k for k in error.instance
            if k not in declared and not any(p.search(k) for p in patterns)
        ]
        return [
            (path_of(at + [k]), "unknown field %s" % show(path_of(at + [k]))) for k in sorted(extra)
        ]
    if error.validator == "required":
        missing = [r for r in error.validator_value if r not in error.instance]
        return [(path_of(at + [m]), "Required value") for m in missing]
    if error.validator == "enum":
        allowed = ", ".join(show(v) for v in error.validator_value if v is not None)
        return [(path_of(at), "Unsupported value: %s: supported values: %s" % (show(error.instance), allowed))]
    if error.validator == "type":
        want = error.validator_value
        want = [w for w in want if w != "null"] if isinstance(want, list) else [want]
        hint = ""
        if isinstance(error.instance, bool) and "string" in want:
            hint = " (YAML 1.1 reads an unquoted off, on, yes or no as a boolean)"
        return [(path_of(at), "Invalid value: %s: must be of type %s%s" % (show(error.instance), " or ".join(want), hint))]
    bound = error.validator_value
    if isinstance(bound, float) and bound.is_integer():
        bound = int(bound)
    worded = {
        "minimum": "must be greater than or equal to %s",
        "maximum": "must be less than or equal to %s",
        "minItems": "must have at least %s items",
        "maxItems": "must have at most %s items",
        "minLength": "must be at least %s characters long",
        "maxLength": "must be at most %s characters long",
        "pattern": "must match the pattern %s",
    }
    if error.validator in worded:
        value = show(error.instance) if not isinstance(error.instance, list) else "%d items" % len(error.instance)
        return [(path_of(at), "Invalid value: %s: %s" % (value, worded[error.validator] % (show(bound) if error.validator == "pattern" else bound)))]
    return [(path_of(at), error.message)]


def check(doc, n, defs):
    """(label, [(path, message)]) for one document."""
    if not isinstance(doc, dict):
        return "document %d" % n, [("(root)", "not an object: %s" % show(doc))]
    kind = doc.get("kind")
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name")
    label = "%s/%s" % (kind or "(no kind)", name if isinstance(name, str) and name else "(document %d)" % n)
    kinds = sorted({k for _, k in defs})
    if kind not in kinds:
        return label, [("kind", "unknown kind %s: the definitions define %s" % (show(kind), ", ".join(kinds)))]
    versions = sorted(gv for gv, k in defs if k == kind)
    api_version = doc.get("apiVersion")
    if (api_version, kind) not in defs:
        return label, [("apiVersion", "%s is not %s" % (show(api_version), " or ".join(show(v) for v in versions)))]
    validator, scope = defs[(api_version, kind)]
    found = []
    for e in validator.iter_errors(doc):
        found.extend(errors_of(e))
    # A value of the wrong type: that alone, as the API server says it (not also its enum).
    mistyped = {p for p, m in found if m.startswith("Invalid value") and "must be of type" in m}
    found = [(p, m) for p, m in found if p not in mistyped or "must be of type" in m]
    if isinstance(name, str) and name and (len(name) > 253 or not DNS_SUBDOMAIN.match(name)):
        found.append(("metadata.name", "Invalid value: %s: not a DNS subdomain (lowercase letters, digits, `-` and `.`)" % show(name)))
    ns = meta.get("namespace")
    if scope == "Namespaced" and isinstance(ns, str) and (len(ns) > 63 or not DNS_LABEL.match(ns)):
        found.append(("metadata.namespace", "Invalid value: %s: not a namespace name" % show(ns)))
    if scope != "Namespaced":
        found = [
            ("metadata.namespace", "%s is cluster-scoped: it has no namespace" % kind)
            if p == "metadata.namespace" else (p, m)
            for p, m in found
        ]
    return label, sorted(set(found))


def main(argv):
    if len(argv) < 3 or argv[1] in ("-h", "--help"):
        print("usage: schema_check.py CRDS.yaml MANIFEST.yaml... (see the module doc)", file=sys.stderr)
        return 2
    try:
        defs = definitions(argv[1])
    except (OSError, yaml.YAMLError, ValueError, jsonschema.SchemaError) as e:
        print("%s: unusable definitions: %s" % (argv[1], e), file=sys.stderr)
        return 2
    failed = False
    for path in argv[2:]:
        try:
            docs = load_all(path)
        except (OSError, yaml.YAMLError) as e:
            print("%s: %s" % (path, " ".join(str(e).split())))
            failed = True
            continue
        if not docs:
            print("%s: no documents" % path)
            failed = True
        for n, doc in enumerate(docs, 1):
            label, found = check(doc, n, defs)
            if found:
                failed = True
                print("%s: %s: %s" % (path, label, "; ".join("%s: %s" % e for e in found)))
            else:
                print("%s: %s passed" % (path, label))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
