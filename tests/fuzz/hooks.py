"""Schemathesis hooks for scripts/fuzz-api: rules between fields that JSON Schema
cannot state, applied to every generated request (all phases) so that a
"schema-valid request rejected" is always a real mismatch between the document
and the server."""

import schemathesis


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    operation = case.operation
    body = case.body
    if (
        operation.method.upper() == "POST"
        and operation.path == "/CCP/algoService/workloads"
        and isinstance(body, dict)
        and isinstance(body.get("labels"), dict)
    ):
        # B.2: the labelSelector must select the pod labels (every selector key is a
        # label with the same value), as in Kubernetes.
        body["labelSelector"] = dict(body["labels"])
