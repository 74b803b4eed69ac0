"""The data download, against a zip served from a local HTTP server (the real URL is unreachable here)."""

import functools
import http.server
import threading
import zipfile

import pytest

from conftest import make_dataset, run_cli
from flowers.download import class_counts, download
from flowers.errors import UserError


@pytest.fixture
def served_zip(tmp_path):
    """http://127.0.0.1:PORT/flower_dataset.zip holding flower_dataset/<class>/*.jpg (3 per class)."""
    root = make_dataset(tmp_path / "src" / "flower_dataset", per_class=3)
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "flower_dataset.zip", "w") as archive:
        for path in sorted(root.rglob("*.jpg")):
            archive.write(path.resolve(), path.relative_to(root.parent))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/flower_dataset.zip"
    server.shutdown()


COUNTS = {name: 3 for name in ["daisy", "dandelion", "rose", "sunflower", "tulip"]}


def test_download_unpacks_and_checks_counts(served_zip, tmp_path):
    folder = download(tmp_path / "data", url=served_zip, expected=COUNTS)
    assert folder == tmp_path / "data" / "flower_dataset"
    assert class_counts(folder) == COUNTS
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["flower_dataset"]  # no leftovers


def test_wrong_counts_are_reported_and_nothing_is_kept(served_zip, tmp_path):
    with pytest.raises(UserError, match="unexpected images per class"):
        download(tmp_path / "data", url=served_zip, expected={**COUNTS, "rose": 583})
    assert not (tmp_path / "data" / "flower_dataset").exists()


def test_download_command_line(served_zip, tmp_path):
    proc = run_cli("python", "-m", "flowers.download", "--dest", str(tmp_path / "d"), cwd=tmp_path,
                   env={"FLOWERS_DATA_URL": served_zip}, check=False)
    # the served zip is a 15-image stand-in, so the real per-class counts do not match
    assert proc.returncode == 2 and "unexpected images per class" in proc.stderr
