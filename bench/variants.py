"""The variants the benchmark measures: their names, labels and what each is compared with
(shared by run.py, which measures them, and report.py, which writes them up)."""
import json

FAR_FUTURE = 4102444800  # 2100-01-01
IDP_ANSWER = json.dumps({"active": True, "scope": "read", "sub": "bench-user", "client_id": "bench-client",
                         "exp": FAR_FUTURE})


LADDER = [
    ("B  no-op (floor)", ""),
    # The SDK's copy of the map; tokengate reads the same buffer in place (cheaper).
    ("+ whole header map", "map"),
    ("+ sha256", "map,sha256"),
    ("+ clock read", "map,sha256,time"),
    # tokengate's counters are batched per worker (src/metrics.rs), so the ladder has none.
    ("+ 3 header writes", "map,sha256,time,headers"),
    # Not cumulative: the last step with add_header (what tokengate does) instead of replace_header.
    ("(alt) adds instead of replaces", "map,sha256,time,headers,add"),
]

LADDER_ALT = len(LADDER) - 1

VARIANT_INFO = {
    "A": "bare Envoy, direct response",
    "B": "+ no-op wasm (reads Authorization + 1 shared-data key)",
    "Be": "+ no-op wasm reading a key whose value is empty (as tokengate's denylist generation)",
    "C": "+ tokengate, 1 cached token",
    "C2": "+ tokengate, 1,000 cached tokens rotated",
    "C3": "+ tokengate, 1 cached token, no claim headers written (`claims_to_headers: {}`)",
    "D": "+ ext_authz (HTTP service) to an Envoy answering 200",
    "BL": "+ no-op wasm, 1 KiB token",
    "CL": "+ tokengate, 1 cached 1 KiB token",
    "B4": "+ no-op wasm, 4 KiB token",
    "C4": "+ tokengate, 1 cached 4 KiB token",
    "BJ": "+ no-op wasm, the RS256 JWT",
    "J": "+ tokengate verifying JWTs (`jwt` section), the RS256 JWT cached",
    "N": "+ Envoy's jwt_authn (`local_jwks`, JWT cache on), the RS256 JWT",
}

# The jwt phase: a cached JWT hit, jwt_authn and the floor, all with the same token.
JWT_VARIANTS = ["BJ", "J", "N"]
JWT_ALGS = ["RS256", "PS256", "ES256", "EdDSA"]
# Callgrind's cold verifications: every request a JWT never seen before, signed with one algorithm.
JWT_COLD = [f"{f}{alg}" for f in ("J", "N") for alg in JWT_ALGS]

CG_ORDER = (["A", "B0", "Ba", "Be", "B"] + [f"L{i}" for i in range(1, LADDER_ALT)] + ["C0", "C", f"L{LADDER_ALT}", "C2", "C3", "BL", "CL", "B4", "C4", "D",
                                                                     "M0", "M1", "BJ", "J", "N"] + JWT_COLD)

CG_LABEL = {"A": "A  bare Envoy", "B0": "B  no-op without its shared-data read",
            "Ba": "B  no-op, shared key absent", "Be": "B  no-op, shared key with empty value",
            "B": "B  no-op (floor: key with a value)", "C": "C  tokengate, 1 cached token",
            "C0": "C  tokengate, nothing ever revoked",
            "C2": "C2 tokengate, 1,000 cached tokens", "C3": "C3 tokengate, no claim headers", "D": "D  ext_authz (client side only)",
            "BL": "B  no-op, 1 KiB token", "CL": "C  tokengate, 1 KiB token",
            "B4": "B  no-op, 4 KiB token", "C4": "C  tokengate, 4 KiB token",
            "M0": "M0 no-op + 1 callout (miss floor)", "M1": "M1 tokengate, every request a miss",
            "BJ": "B  no-op, the RS256 JWT", "J": "J  tokengate, the RS256 JWT cached",
            "N": "N  jwt_authn, the RS256 JWT cached",
            **{f"J{alg}": f"J  tokengate, every request a new {alg} JWT" for alg in JWT_ALGS},
            **{f"N{alg}": f"N  jwt_authn, every request a new {alg} JWT" for alg in JWT_ALGS},
            **{f"L{i}": label for i, (label, _) in enumerate(LADDER) if i}}

CG_REF = {"B0": "A", "Ba": "B0", "Be": "B0", "B": "B0", "L1": "B", **{f"L{i}": f"L{i - 1}" for i in range(2, LADDER_ALT)}, "C": f"L{LADDER_ALT - 1}", "C0": "C",
          f"L{LADDER_ALT}": f"L{LADDER_ALT - 1}", "C2": "C", "C3": "C", "BL": "B", "CL": "C", "B4": "BL", "C4": "CL", "D": "A", "M0": "A", "M1": "M0",
          "BJ": "B", "J": "BJ", "N": "BJ", **{c: c[0] for c in JWT_COLD}}
