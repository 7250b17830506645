"""The API's OpenAPI 3.1 document, built from the route table plus one description per operation."""

from __future__ import annotations

import html
import json
from typing import Any

from starlette.routing import BaseRoute, Route

_PROBLEM = {"$ref": "#/components/responses/Problem"}
_ID = {"name": "service_id", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"}}


def _q(name: str, schema: dict[str, Any], text: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": text}


_SKI = {"name": "ski", "in": "path", "required": True,
        "schema": {"type": "string", "description": "a CA's subject key identifier, hex"}}
_PEM_OR_DER = _q("format", {"enum": ["pem", "der"]}, "")
_DER_OR_PEM = _q("format", {"enum": ["der", "pem"]}, "")

_PAGE = [_q("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "page size"),
         _q("cursor", {"type": "string"}, "next_cursor of the previous page")]


def _json_body(ref: str, required: bool = True) -> dict[str, Any]:
    return {"required": required,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}



_PEM = {"content": {"application/x-pem-file": {"schema": {"type": "string"}},
                    "application/pkix-cert": {"schema": {"type": "string", "format": "binary"}}}}

# handler name -> (summary, security, extra operation fields, success status, success schema ref)
OPERATIONS: dict[str, tuple[str, list[str], dict[str, Any], str, str | None]] = {
    "request_certificate": ("Issue a certificate from a CSR (enrolment token, own mTLS certificate, or admin)",
                            ["enrolment", "mtls", "admin"], {"requestBody": _json_body("CertificateRequest")},
                            "201", "Issued"),
    "list_certificates": ("List certificates", ["mtls", "admin"], {"parameters": [
        _q("service_id", {"type": "string"}, "only this service"),
        _q("status", {"enum": ["valid", "revoked", "expired"]}, "only this status"),
        _q("expiring_within_days", {"type": "integer", "minimum": 0, "maximum": 36500},
           "valid and expiring within N days"),
        *_PAGE]}, "200", "CertificatePage"),
    "get_certificate": ("The service's current certificate", ["mtls", "admin"], {"parameters": [_ID]},
                        "200", "Certificate"),
    "download_certificate": ("PEM of the current certificate", ["mtls", "admin"], {"parameters": [
        _ID, _q("chain", {"type": "boolean"}, "append intermediate and root")]}, "200", None),
    "renew_certificate": ("Renew (same key) or rekey (with a CSR)", ["mtls", "admin"], {
        "parameters": [_ID], "requestBody": _json_body("RenewRequest", False)}, "201", "Issued"),
    "revoke_certificate": ("Revoke the current (or given) certificate; keyCompromise also revokes every "
                           "unexpired certificate with the same key; the CRL is regenerated",
                           ["mtls", "admin"], {"parameters": [
                               _ID, _q("reason", {"type": "string"}, "RFC 5280 reason name, e.g. keyCompromise"),
                               _q("serial", {"type": "string"}, "lowercase hex serial"),
                               _q("all", {"type": "boolean"}, "every unexpired certificate of the service")]},
                           "200", "Revoked"),
    "list_services": ("The service registry", ["mtls", "admin"], {"parameters": [
        _q("healthy", {"type": "boolean"}, "only services whose last probe succeeded"), *_PAGE]},
        "200", "ServicePage"),
    "register_service": ("Register a service (admin, 201 with enrolment token) or update own entry (mTLS, 200)",
                         ["admin", "mtls"], {"requestBody": _json_body("ServiceRegistration")}, "201", "Service"),
    "get_service": ("One registry entry with its certificates", ["mtls", "admin"], {"parameters": [_ID]},
                    "200", "Service"),
    "update_service": ("Change a registry entry (admin: anything; service: own descriptive fields)",
                       ["admin", "mtls"], {"parameters": [_ID], "requestBody": _json_body("ServiceUpdate")},
                       "200", "Service"),
    "decommission_service": ("Decommission a service: revoke its unexpired certificates, spend its "
                             "enrolment tokens, drop it from the registry", ["admin"], {"parameters": [_ID]},
                             "200", "Decommissioned"),
    "new_enrolment_token": ("A fresh one-time enrolment token for a service", ["admin"],
                            {"parameters": [_ID]}, "201", None),
    "ca_root": ("Root CA certificate", [], {"parameters": [_PEM_OR_DER]}, "200", None),
    "ca_intermediate": ("Intermediate CA certificate", [], {"parameters": [_PEM_OR_DER]}, "200", None),
    "ca_chain": ("Intermediate then root, PEM", [], {}, "200", None),
    "ca_intermediate_by_ski": ("An intermediate CA certificate by its subject key identifier (hex): what "
                               "a leaf's AIA names", [], {"parameters": [_SKI, _PEM_OR_DER]}, "200", None),
    "ca_bundle": ("Every unexpired intermediate, then the trusted roots, PEM", [], {}, "200", None),
    "ca_roots": ("The trusted roots, PEM (two while a root rotates)", [], {}, "200", None),
    "crl": ("The current CRL (DER; ?format=pem for PEM)", [], {"parameters": [_DER_OR_PEM]}, "200", None),
    "crl_of_issuer": ("The CRL of one CA by its subject key identifier (hex): the intermediate's, or the "
                      "root's (revoked intermediates)", [], {"parameters": [_SKI, _DER_OR_PEM]}, "200", None),
    "health": ("Readiness: 503 while the database does not answer or writes fail", [], {}, "200", None),
    "openapi": ("This document", [], {}, "200", None),
    "audit_log": ("The audit log, newest first (admin)", ["admin"], {"parameters": [
        _q("since", {"type": "string", "format": "date-time"}, "entries at or after this time"),
        _q("service_id", {"type": "string"}, "only this service"), *_PAGE]}, "200", None),
    "liveness": ("Liveness: the process answers (no database question)", [], {}, "200", None),
    "api_docs": ("This document as a page to read (HTML)", [], {}, "200", None),
    "metrics": ("Prometheus metrics, text format (admin or metrics token)", ["admin", "metrics"], {}, "200", None),
}

_STR = {"type": "string"}
_STRS = {"type": "array", "items": _STR}
_TIME = {"type": "string", "format": "date-time"}
_LIFETIME = {"validity_days": {"type": "integer", "minimum": 1},
             "validity_seconds": {"type": "integer", "minimum": 300, "description": "or validity_days, not both"}}
_SERVICE_LIFETIMES = {name: {"type": ["integer", "null"], "minimum": 300, "description": "admin only"}
                      for name in ("default_validity_seconds", "max_validity_seconds")}
SCHEMAS: dict[str, Any] = {
    "CertificateRequest": {"type": "object", "required": ["service_id", "csr"], "properties": {
        "service_id": _STR, "csr": {"type": "string", "description": "PEM CSR"}, **_LIFETIME}},
    "RenewRequest": {"type": "object", "properties": {
        "csr": _STR, **_LIFETIME, "description": "without a lifetime: that of the certificate renewed"}},
    "Issued": {"type": "object", "properties": {
        "service_id": _STR, "serial_number": _STR, "certificate": _STR, "chain": _STR,
        "not_before": _TIME, "not_after": _TIME, "fingerprint_sha256": _STR}},
    "Certificate": {"type": "object", "properties": {
        "service_id": _STR, "serial_number": _STR, "subject": _STR, "san_dns": _STRS, "san_ip": _STRS,
        "not_before": _TIME, "not_after": _TIME, "issued_at": _TIME,
        "status": {"enum": ["valid", "revoked", "expired", "not_yet_valid"]},
        "fingerprint_sha256": _STR, "revoked_at": {"type": ["string", "null"]},
        "revocation_reason": {"type": ["string", "null"]}}},
    "Revoked": {"allOf": [{"$ref": "#/components/schemas/Certificate"}, {"type": "object", "properties": {
        "revoked_serials": {**_STRS, "description": "every serial this call revoked, the named one first"}}}]},
    "Decommissioned": {"type": "object", "properties": {
        "service_id": _STR, "status": {"const": "decommissioned"}, "revoked_serials": _STRS}},
    "ServiceRegistration": {"type": "object", "required": ["service_id"], "properties": {
        "service_id": _STR, "service_name": _STR, "endpoints": _STRS, "health_check_url": _STR,
        "version": _STR, "owner": _STR, "metadata": {"type": "object"}, "san_dns": _STRS, "san_ip": _STRS,
        **_SERVICE_LIFETIMES}},
    "ServiceUpdate": {"type": "object", "properties": {
        "service_name": _STR, "endpoints": _STRS, "health_check_url": _STR, "version": _STR,
        "owner": _STR, "metadata": {"type": "object"}, "san_dns": _STRS, "san_ip": _STRS, **_SERVICE_LIFETIMES}},
    "Service": {"type": "object", "properties": {
        "service_id": _STR, "service_name": _STR, "endpoints": _STRS, "health": {"type": "object"},
        "certificates": {"type": "array", "items": {"$ref": "#/components/schemas/Certificate"}}}},
    "CertificatePage": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Certificate"}},
        "next_cursor": {"type": ["string", "null"]}}},
    "ServicePage": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Service"}},
        "next_cursor": {"type": ["string", "null"]}}},
    "Problem": {"type": "object", "required": ["type", "title", "status", "code"], "properties": {
        "type": _STR, "title": _STR, "status": {"type": "integer"}, "detail": _STR, "code": _STR}},
}


def openapi_document(routes: list[BaseRoute]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or route.methods is None:
            continue
        name = route.name
        summary, security, extra, status, schema = OPERATIONS[name]
        for method in sorted(route.methods - {"HEAD"}):
            success: dict[str, Any] = {"description": "success"}
            if schema:
                success["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
            elif name.startswith("ca_") or name == "download_certificate":
                success.update(_PEM)
            operation = {"operationId": name, "summary": summary, **extra,
                         "responses": {status: success, "default": _PROBLEM}}
            if security:
                operation["security"] = [{s: []} for s in security]
            paths.setdefault(route.path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "VCC PKI", "version": "1", "description":
                 "Private CA for mutual TLS between internal services. Errors are RFC 9457 problem documents."},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "responses": {"Problem": {"description": "RFC 9457 problem document", "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}},
            "securitySchemes": {
                "admin": {"type": "http", "scheme": "bearer", "description": "admin token (pki-admin token create)"},
                "enrolment": {"type": "http", "scheme": "bearer", "description": "one-time enrolment token"},
                "metrics": {"type": "http", "scheme": "bearer",
                            "description": "metrics token (pki-admin token create --scope metrics): /metrics only"},
                "mtls": {"type": "mutualTLS", "description": "client certificate issued by this CA"},
            },
        },
    }


def openapi_html(document: dict[str, Any]) -> str:
    """``/docs``: the OpenAPI document as one plain HTML page (no scripts, nothing fetched):
    each operation with who may call it, its parameters and body, and the schemas."""
    def esc(value: object) -> str:
        return html.escape(str(value))

    who = {"admin": "admin token", "enrolment": "enrolment token", "mtls": "own client certificate",
           "metrics": "metrics token"}
    rows = []
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            callers = ", ".join(who[next(iter(s))] for s in op.get("security", [])) or "anyone"
            params = ", ".join(f"{p['name']} ({p['in']})" for p in op.get("parameters", []))
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            body_ref = body.get("$ref", "").rsplit("/", 1)[-1]
            status = next(iter(op["responses"]))
            rows.append(f"<tr><td><code>{esc(method.upper())}</code></td><td><code>{esc(path)}</code></td>"
                        f"<td>{esc(op['summary'])}</td><td>{esc(callers)}</td><td>{esc(params)}</td>"
                        f"<td>{f'<a href=#{esc(body_ref)}>{esc(body_ref)}</a>' if body_ref else ''}</td>"
                        f"<td>{esc(status)}</td></tr>")
    schemas = []
    for name, schema in document["components"]["schemas"].items():
        fields = "".join(f"<li><code>{esc(field)}</code>{' (required)' if field in schema.get('required', []) else ''}"
                         f": {esc(json.dumps(spec))}</li>" for field, spec in schema.get("properties", {}).items())
        schemas.append(f"<h3 id={esc(name)}>{esc(name)}</h3><ul>{fields}</ul>")
    info = document["info"]
    return ("<!doctype html><html><head><meta charset=utf-8><title>VCC PKI API</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top}</style></head><body>"
            f"<h1>{esc(info['title'])} API</h1><p>{esc(info['description'])} The machine-readable form: "
            "<a href=/openapi.json>/openapi.json</a>. Bearer tokens go in <code>Authorization: Bearer ...</code>."
            "</p><table><tr><th>method</th><th>path</th><th>what it does</th><th>who may call</th>"
            "<th>parameters</th><th>body</th><th>success</th></tr>" + "".join(rows) + "</table><h2>Schemas</h2>"
            + "".join(schemas) + "</body></html>")
