"""What a wasm failure looks like in Envoy's log (Envoy 1.40, V8), for the checks
that Envoy kept its filter alive (tests/e2e/test_hardening.py, tests/soak/soak.py).

A Rust panic in the module logs, and then the worker's VM is dead (503 for good):

    [critical][wasm] [.../context.cc:1160] wasm log <root> <vm> <id>: panicked at src/x.rs:20:22:
    [error][wasm] [.../wasm_vm.cc:38] Function: proxy_on_request_headers failed: Uncaught RuntimeError: unreachable
    Proxy-Wasm plugin in-VM backtrace: ...

A VM that cannot start logs "Wasm VM failed ..." and "Plugin configured to fail
closed failed to load". The plugin's own lines ("wasm log ...") may say "failed"
or "unreachable" about the IdP: there, only the panic hook's text counts.
"""
import re

ENVOY_FAILURE = re.compile(
    r"panicked|Function: proxy_on_\w+ failed|RuntimeError|\bunreachable\b|in-VM backtrace"
    r"|Wasm VM failed|fail closed failed|wasm.*(failed|crash|abort)",
    re.IGNORECASE,
)
PLUGIN_FAILURE = re.compile(r"panicked", re.IGNORECASE)


def failure_lines(text):
    """The lines of an Envoy log that tell of a wasm failure (cut to 300 characters)."""
    bad = []
    for line in text.splitlines():
        pattern = PLUGIN_FAILURE if "wasm log" in line else ENVOY_FAILURE
        if pattern.search(line):
            bad.append(line[:300])
    return bad
