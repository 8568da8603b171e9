"""Where things are, and the loopback every test server binds."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SERVERS = REPO / "tests" / "servers"
IDP_DIR = REPO / "tests" / "idp"
ENVOY_TEMPLATE = REPO / "envoy" / "envoy.yaml"
PLUGIN_CONFIG = REPO / "envoy" / "tokengate.json"
LOOPBACK = "127.0.0.1"
GATEWAY_CLIENT = ("gateway", "gateway-secret")
