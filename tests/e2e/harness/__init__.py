"""End-to-end harness: processes, the test servers, Envoy, etcd, HTTP helpers and the
assertions the test files share.

Everything binds 127.0.0.1 on free ports. Every process is started in its own
process group and killed on teardown, at interpreter exit, on SIGTERM or Ctrl-C
(see conftest.py), and by the kernel if the test runner itself is SIGKILLed.

  paths       where the repository's files are; LOOPBACK; the gateway's IdP client
  processes   wait_until, free ports, Processes (process groups that die with the run)
  client      Response, request/get/burst, bearer, forms and JSON
  config      merge and deep_diff of plugin configurations
  servers     the echo upstream, the mock IdP and oidc-provider
  envoy       Envoy from envoy/envoy.yaml with test ports; Listener; its stats
  etcd        an etcd cluster and what Envoy and the filter need to reach it
  asserts     what a client sees: denials, the fail-closed 503, admin answers; test tokens
"""
from .jwt import JWT_AUDIENCE, JWT_ISSUER, JwtIssuer, b64, decode, high_s_twin, jwt_section, unb64
from .asserts import (
    ADMIN,
    ADMIN_REALM,
    ADMIN_TOKEN,
    FORM,
    HEALTH_CONNECTIONS,
    JSON_TYPE,
    PREFIX,
    REALM,
    LogWatch,
    assert_admin_challenge,
    assert_admin_refused,
    assert_denied,
    assert_fails_closed,
    assert_invalid_token,
    assert_not_from_upstream,
    assert_ok,
    assert_still_serving,
    challenge,
    from_upstream,
    issue,
    sha256,
    sleep_until,
    unique,
    unknown_token,
    upstream_headers,
)
from .client import Response, basic_auth, bearer, burst, get, post_form, post_json, request
from .config import deep_diff, merge
from .envoy import (
    Envoy,
    Listener,
    _http_manager,
    _named,
    _wasm_plugins,
    loopback_cluster,
    parse_stats,
    shipped_admin_additions,
)
from .etcd import Etcd, EtcdMember
from .paths import ENVOY_TEMPLATE, GATEWAY_CLIENT, IDP_DIR, LOOPBACK, PLUGIN_CONFIG, REPO, SERVERS
from .processes import Proc, Processes, free_port, port_accepts, wait_for_port, wait_until
from .servers import EchoUpstream, Idp, MockIdp, OidcIdp
