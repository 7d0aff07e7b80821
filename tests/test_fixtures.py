"""The golden fixtures in tests/fixtures are the original-implementation outputs, byte for byte.

They were copied from the project's shared fixture folder; these digests were taken from that folder at the copy.
A changed or missing file here means a fixture was edited, which the comparisons against the originals must never
allow.
"""

import hashlib

import pytest
from helpers import FIXTURES

SHA256 = {
    "microdit/microdit_public.json": "59ff1dcf4e6dbb77fcf71500a7c8767c8013d902eb0cae5748223aa7353b0e7e",
    "microdit/microdit_public_io.safetensors": "13c8650c458ef603ce637549c85ce89ccfd1050e722116433fc7d77570f27f2e",
    "microdit/microdit_public_state_dict.safetensors": "59fffbdd24e56687eb6db605802a744f747de90b4d69a042cc38ee0cd8205c3f",
    "microdit/microdit_reference_architectures.json": "09a1ed03c971cee7741ccab4adfac97cf60acf8e2809433369203d0cdd1ac4de",
    "openclip_text/README.md": "0135daa206440c6311de4134bcbc6965dc37a87b31844b67c920f68732f5f3e4",
    "openclip_text/openclip_text_public.json": "e222a4bb5e33be1733f10d259bf3efb39a27313abf232a36510771e655d50291",
    "openclip_text/openclip_text_public_io.safetensors": "a7450f88d1e28e697e0ed0fde2d3b949021da5f428c463ff6f344ac3360f196b",
    "openclip_text/openclip_text_public_state_dict.safetensors": "5a2bdbe7ce8372868a327995f9929a00af1f9da66c3c274c97cb0799754b4b22",
    "pixart_kv/pixart_kv.json": "8e7e9d9cf4ceb3d7e36c6ea330173afbbcf69ce66ce7eef89ee8f9a9dbbf35f9",
    "pixart_kv/pixart_kv_io.safetensors": "7d04c8d2d0e5d33eecf214b2526823662b5cea398f969fc41f65db232176a965",
    "pixart_kv/pixart_kv_weights.safetensors": "2084df8af539dd6fc81a28903aec166bacbf08f1cffac10d4d25fb88bed92a6a",
}  # fmt: skip


def test_fixture_folder_holds_exactly_the_golden_files():
    present = sorted(str(path.relative_to(FIXTURES)) for path in FIXTURES.rglob("*") if path.is_file())
    assert present == sorted(SHA256)


@pytest.mark.parametrize("name", sorted(SHA256))
def test_fixture_bytes_are_unchanged(name):
    assert hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest() == SHA256[name]
