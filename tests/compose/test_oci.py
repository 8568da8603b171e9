"""`make oci`, the Istio WasmPlugin image, built with the engine under test (ENGINE) and
taken apart again: one layer, holding the release module as plugin.wasm and nothing else."""
import io
import json
import os
import secrets
import subprocess
import tarfile

from conftest import ENGINE, REPO, run

MODULE = REPO / "target" / "tokengate.wasm"


def image_files(archive):
    """{layer index: {path: bytes}} of an image saved by `<engine> save` (docker-archive)."""
    with tarfile.open(archive) as outer:
        (manifest,) = json.load(outer.extractfile("manifest.json"))
        layers = {}
        for index, name in enumerate(manifest["Layers"]):
            with tarfile.open(fileobj=io.BytesIO(outer.extractfile(name).read())) as layer:
                layers[index] = {
                    member.name.removeprefix("./"): layer.extractfile(member).read() if member.isfile() else member.type
                    for member in layer.getmembers()
                }
        return layers


def test_oci_image_holds_exactly_the_module_as_plugin_wasm(tmp_path):
    image = f"localhost/tokengate-oci-test:{secrets.token_hex(4)}"
    env = dict(os.environ, OCI_CLIENT=ENGINE)
    proc = subprocess.run(
        ["make", "--no-print-directory", "oci", f"OCI_IMAGE={image}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"built {image} with {ENGINE}" in proc.stdout
        archive = tmp_path / "image.tar"
        run([ENGINE, "save", "-o", archive, image])
        assert image_files(archive) == {0: {"plugin.wasm": MODULE.read_bytes()}}
    finally:
        run([ENGINE, "rmi", "-f", image], check=False)
