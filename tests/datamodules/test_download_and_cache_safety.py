"""Downloads, archives, caches and pickles are never trusted blindly.

* downloads: a temporary file, checksum-verified, then renamed; interrupted or mismatching downloads leave nothing;
  a file already at the destination is never overwritten.
* archives: members that could escape the archive or are not plain files are refused before they become class or
  file names; damaged archives fail with the archive named; the one extraction (``.ci/learn2learn.sh``) is filtered.
* caches: keyed by a hash of sources and settings, written atomically, rebuilt once with a warning when stale,
  truncated, inconsistent or holding pickled code.

No network: downloads come from a local ``http.server`` on 127.0.0.1 or a patched ``urlopen``.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import os
import pickle
import re
import stat
import tarfile
import threading
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omniglot_fakes import make_fake_omniglot
from PIL import Image

from lightning_mtl.datamodules import EpisodeSettings, OmniglotEpisodes, _omniglot_archives, omniglot
from lightning_mtl.datamodules._download import DownloadError, download_file
from lightning_mtl.datamodules._images import FileTree, load_cache, save_cache
from lightning_mtl.datamodules._safe_pickle import UnsafePickleError, safe_load
from lightning_mtl.datamodules.image_folder import ImageFolderEpisodes
from lightning_mtl.datamodules.mini_imagenet import MiniImageNetEpisodes

REPO = Path(__file__).resolve().parents[2]
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: more than one read block of download_file
SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ------------------------------------------------------------------ fakes


def png(seed: int, size: int = 8, mode: str = "L") -> bytes:
    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_omniglot(root: Path) -> Path:
    return make_fake_omniglot(root, chars_per_archive=2, image_size=16)


def omniglot_dm(root: Path, cache: Path, **kw) -> OmniglotEpisodes:
    kw = {"image_size": 8, "download": False, **kw}
    episodes = EpisodeSettings(train_ways=2, eval_ways=2, val_episodes=4, test_episodes=4, eval_meta_batch_size=4)
    return OmniglotEpisodes(root=str(root), cache_dir=str(cache), episodes=episodes, **kw)


def make_classes(folder: Path, classes: int = 6, per_class: int = 4) -> Path:
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            (folder / f"class{c}" / f"{i}.png").write_bytes(png(c * 100 + i, mode="RGB"))
    return folder


def folder_dm(path: Path, cache: Path, **kw) -> ImageFolderEpisodes:
    kw = {"image_size": 8, **kw}
    episodes = EpisodeSettings(train_ways=2, train_queries=1, eval_ways=1, eval_queries=1, eval_meta_batch_size=4,
                               val_episodes=4, test_episodes=4)
    return ImageFolderEpisodes(path=str(path), cache_dir=str(cache), episodes=episodes, **kw)


def ready(d):
    d.prepare_data()
    d.setup()
    return d


def leftovers(folder: Path) -> list[str]:
    """Temporary files of downloads or cache writes left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".tmp")) or ".tmp" in p.suffix)


class Evil:
    """Pickles as a call to ``os.system``: unpickling it blindly creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------ downloads


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/ok``: the payload; ``/short``: announces the payload's length, sends half and hangs up."""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD if self.path == "/ok" else PAYLOAD[: len(PAYLOAD) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_is_verified_then_renamed(server, tmp_path):
    dest = download_file(f"{server}/ok", tmp_path / "data.bin", checksum=SHA)
    assert dest.read_bytes() == PAYLOAD and leftovers(tmp_path) == []


def test_download_cut_by_the_server_leaves_nothing(server, tmp_path):
    with pytest.raises(DownloadError, match=rf"/short: the transfer stopped after {len(PAYLOAD) // 2} of "
                                            rf"{len(PAYLOAD)} bytes; the partial file was discarded"):
        download_file(f"{server}/short", tmp_path / "data.bin", checksum=SHA)
    assert list(tmp_path.iterdir()) == []


class _Response(io.BytesIO):
    """A response whose body breaks with ``error`` after the first block."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(PAYLOAD)
        self.error, self.headers, self.calls = error, {}, 0

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls > 1:
            raise self.error
        return super().read(size)


@pytest.mark.parametrize("error", [ConnectionResetError("reset by peer"), TimeoutError("timed out"),
                                   http.client.IncompleteRead(b"", 10), KeyboardInterrupt()],
                         ids=["reset", "timeout", "incomplete-read", "ctrl-c"])
def test_download_interrupted_mid_stream_leaves_nothing(tmp_path, monkeypatch, error):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(error))
    expected = KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else DownloadError
    with pytest.raises(expected):
        download_file("http://example.invalid/data.bin", tmp_path / "data.bin", checksum=SHA)
    assert list(tmp_path.iterdir()) == [], "no file at dest and no .part left behind"


def test_checksum_mismatch_discards_the_download(server, tmp_path):
    with pytest.raises(DownloadError, match=rf"downloaded with sha256 {SHA}, expected 0+; the file was discarded"):
        download_file(f"{server}/ok", tmp_path / "data.bin", checksum="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_existing_dest_is_returned_when_it_matches_and_never_overwritten(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise AssertionError("no download may start")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD)
    assert download_file("http://example.invalid/x", dest, checksum=SHA) == dest
    dest.write_bytes(PAYLOAD[:1000])  # a partial copy left by another tool
    with pytest.raises(DownloadError, match=r"data\.bin already exists with sha256 \w+, expected \w+ .*left untouched"):
        download_file("http://example.invalid/x", dest, checksum=SHA)
    assert dest.read_bytes() == PAYLOAD[:1000]


@pytest.fixture
def omniglot_server(tmp_path, monkeypatch) -> dict[str, bytes]:
    """Fake official URLs serving a tiny Omniglot, with its checksums in place of the official ones."""
    files = {}
    src = make_omniglot(tmp_path / "upstream") / "omniglot"
    for name in _omniglot_archives.ARCHIVES:
        files[_omniglot_archives.ARCHIVE_URL.format(name=name)] = data = (src / f"{name}.zip").read_bytes()
        monkeypatch.setitem(_omniglot_archives.ARCHIVE_MD5, name, hashlib.md5(data).hexdigest())
    for split in ("train", "val", "test", "trainval"):
        data = (src / "splits" / "vinyals" / f"{split}.txt").read_bytes()
        files[omniglot.SPLIT_URL.format(split=split)] = data
        monkeypatch.setitem(omniglot.SPLIT_SHA256, split, hashlib.sha256(data).hexdigest())

    def urlopen(url, timeout=None):
        body = files[url]
        response = io.BytesIO(body)
        response.headers = {"Content-Length": str(len(body))}
        return response

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return files


def test_omniglot_downloads_verified_files(omniglot_server, tmp_path):
    (tmp_path / "root").mkdir()
    d = ready(omniglot_dm(tmp_path / "root", tmp_path / "cache", download=True))
    assert d.num_classes("train") == 8
    assert leftovers(tmp_path / "root" / "omniglot") == []


def test_omniglot_missing_root_is_created_and_filled_when_downloading(omniglot_server, tmp_path):
    root = tmp_path / "data"  # as ./data on a first run: not there yet
    d = ready(omniglot_dm(root, tmp_path / "cache", download=True))
    assert d.num_classes("train") == 8 and (root / "omniglot" / "images_background.zip").is_file()


def test_omniglot_corrupted_download_never_lands(omniglot_server, tmp_path):
    url = _omniglot_archives.ARCHIVE_URL.format(name="images_evaluation")
    omniglot_server[url] = omniglot_server[url][:-100] + b"\0" * 100  # same length, other bytes
    (tmp_path / "root").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)could not be downloaded.*md5 .* expected .*discarded"):
        omniglot_dm(tmp_path / "root", tmp_path / "cache", download=True).prepare_data()
    folder = tmp_path / "root" / "omniglot"
    assert not (folder / "images_evaluation.zip").exists() and leftovers(folder) == []


def test_present_files_are_used_as_they_are_even_with_download(tmp_path, monkeypatch):
    """Files already there are the user's copies (repacked or rebuilt Omniglot differs byte-wise from the official
    archives, as the shared data does): neither re-downloaded nor compared with the official checksums."""
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download may start"))
    assert ready(omniglot_dm(make_omniglot(tmp_path / "root"), tmp_path / "cache", download=True)).num_classes("test")


def test_truncated_archive_at_dest_is_not_taken_for_a_whole_one(tmp_path):
    root = make_omniglot(tmp_path / "root")
    archive = root / "omniglot" / "images_evaluation.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # an interrupted wget
    with pytest.raises(ValueError, match=r"images_evaluation\.zip is not a readable zip archive .*truncated"):
        omniglot_dm(root, tmp_path / "cache", download=True).prepare_data()


def test_damaged_member_is_named(tmp_path):
    archive = tmp_path / "toy.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # stored, so the member's bytes appear as they are in the file
        zf.writestr("toy/a/0.png", b"MEMBER-PAYLOAD" * 8)
    raw = archive.read_bytes()
    archive.write_bytes(raw.replace(b"MEMBER-PAYLOAD", b"MEMBER-PAYLOAX", 1))
    with FileTree(archive) as tree, pytest.raises(ValueError, match=r"corrupt archive member .*toy\.zip:toy/a/0\.png"
                                                                    r" \(Bad CRC-32.*replace it"):
        tree.read(tree.files()[0])


# ------------------------------------------------------------------ archive members


def _add_member(archive: Path, name: str, mode: int | None = None, data: bytes = b"x") -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about duplicate names
        with zipfile.ZipFile(archive, "a") as zf:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)


OMNIGLOT_UNSAFE = [
    ("images_background/../character01/0001_01.png", None, "'..' path component"),
    ("/images_background/Alpha/character09/0009_01.png", None, "absolute path"),
    ("C:/images_background/Alpha/character09/0009_01.png", None, "absolute path"),
    ("images_background/Alpha/character01/0001_99.png", stat.S_IFLNK | 0o777, "symbolic link"),
    ("images_background/Alpha/character01/0001_98.png", stat.S_IFIFO | 0o644, "device, FIFO or socket"),
    ("images_background/Alpha/character01/0001_97.png", stat.S_IFCHR | 0o644, "device, FIFO or socket"),
    ("images_background/Alpha/character01/0001_01.png", None, "listed twice in the archive"),
]


@pytest.mark.parametrize("member,mode,why", OMNIGLOT_UNSAFE, ids=[w for _, _, w in OMNIGLOT_UNSAFE])
def test_omniglot_refuses_unsafe_members(tmp_path, member, mode, why):
    root = make_omniglot(tmp_path / "root")
    archive = root / "omniglot" / "images_background.zip"
    _add_member(archive, member, mode, png(0, 16) if mode is None else b"/etc/passwd")
    with pytest.raises(ValueError, match=rf"images_background\.zip: refusing {re.escape(repr(member))} \({why}.*"
                                         rf"remove that entry or use a clean copy"):
        omniglot_dm(root, tmp_path / "cache").prepare_data()
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("member,mode,why", [
    ("toy/..\\..\\evil.png", None, "'..' path component"),
    ("toy/class0/fifo.png", stat.S_IFIFO | 0o644, "device, FIFO or socket"),
    ("toy/class0/0.png", None, "listed twice in the archive"),
], ids=["backslash-dotdot", "fifo", "duplicate"])
def test_image_zip_refuses_unsafe_members(tmp_path, member, mode, why):
    folder = make_classes(tmp_path / "toy")
    archive = tmp_path / "toy.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, f"toy/{p.relative_to(folder).as_posix()}")
    _add_member(archive, member, mode, png(0, mode="RGB"))
    with pytest.raises(ValueError, match=rf"toy\.zip: refusing {re.escape(repr(member))} \({why}"):
        folder_dm(archive, tmp_path / "cache").prepare_data()


def test_extracted_omniglot_folder_refuses_links(tmp_path):
    root = make_omniglot(tmp_path / "root")
    folder = root / "omniglot"
    for name in _omniglot_archives.ARCHIVES:
        with zipfile.ZipFile(folder / f"{name}.zip") as zf:
            zf.extractall(folder)
        (folder / f"{name}.zip").unlink()
    os.symlink("/etc/passwd", folder / "images_background" / "Alpha" / "character01" / "0001_99.png")
    with pytest.raises(ValueError, match=r"refusing 'Alpha/character01/0001_99\.png' \(symbolic link"):
        omniglot_dm(root, tmp_path / "cache").prepare_data()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_image_folder_refuses_fifo_instead_of_hanging(tmp_path):
    folder = make_classes(tmp_path / "toy")
    os.mkfifo(folder / "class1" / "9.png")  # reading it would block forever
    with pytest.raises(ValueError, match=r"refusing 'class1/9\.png' \(device, FIFO or socket"):
        folder_dm(folder, tmp_path / "cache").prepare_data()


def test_mini_imagenet_csv_cannot_name_files_outside_images(tmp_path):
    folder = tmp_path / "root" / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "n0100000001.jpg").write_bytes(png(1, mode="RGB"))
    (folder / "secret.jpg").write_bytes(png(2, mode="RGB"))
    for split in ("train", "val", "test"):
        (folder / f"{split}.csv").write_text("filename,label\nn0100000001.jpg,n01\n../secret.jpg,n01\n")
    d = MiniImageNetEpisodes(root=str(tmp_path / "root"), cache_dir=str(tmp_path / "cache"), check_protocol=False)
    with pytest.raises(FileNotFoundError, match=r"\.\./secret\.jpg"):
        d.prepare_data()


def test_the_only_extraction_is_checksummed_and_filtered(tmp_path):
    """``.ci/learn2learn.sh`` checks the sdist's pinned sha256 before extracting it with tarfile's ``data`` filter,
    which this Python supports and which refuses ``..``, absolute paths and links leaving the destination."""
    script = (REPO / ".ci" / "learn2learn.sh").read_text()
    assert re.search(r"^SHA256=[0-9a-f]{64}$", script, re.M)
    check, extract = script.index("if digest != sha:"), script.index('extractall(work, filter="data")')
    assert check < extract
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        for name, kind in (("../escaped.txt", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            info.size = 0
            tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "dest").mkdir()
    for member in ("../escaped.txt", "link"):
        with tarfile.open(archive) as tar, pytest.raises(tarfile.FilterError):
            tar.extract(member, tmp_path / "dest", filter="data")
    assert not (tmp_path / "escaped.txt").exists() and list((tmp_path / "dest").iterdir()) == []


# ------------------------------------------------------------------ caches


def test_omniglot_cache_keyed_by_sources_and_settings_and_rebuilt_when_stale(tmp_path):
    root = make_omniglot(tmp_path / "root")
    d = ready(omniglot_dm(root, tmp_path / "cache"))
    old_path, old = d.cache_path(), d.samplers["train"].images.copy()
    assert omniglot_dm(root, tmp_path / "cache", image_size=10).cache_path() != old_path, "settings are in the key"
    archive = root / "omniglot" / "images_background.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # the same names, other drawings
        for c in (1, 2):
            for k in range(1, 21):
                name = f"images_background/Alpha/character{c:02d}/{c:04d}_{k:02d}.png"
                zf.writestr(name, png(9000 + c * 100 + k, 16))
    fresh = ready(omniglot_dm(root, tmp_path / "cache"))
    assert fresh.cache_path() != old_path and fresh.cache_path().exists()
    assert not np.array_equal(fresh.samplers["train"].images, old), "the stale cache must not be used"


def test_image_cache_keyed_by_content_of_zips_and_stat_of_folders(tmp_path):
    folder = make_classes(tmp_path / "toy")
    path = folder_dm(folder, tmp_path / "cache").cache_path()
    # same bytes, another mtime: folders are keyed by path, size and mtime
    os.utime(folder / "class0" / "0.png", ns=(1_600_000_000 * 10**9,) * 2)
    assert folder_dm(folder, tmp_path / "cache").cache_path() != path
    archive, keys = tmp_path / "toy.zip", []
    for content in (b"one", b"two"):
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(folder.rglob("*.png")):
                zf.write(p, f"toy/{p.relative_to(folder).as_posix()}")
            zf.writestr("toy/README", content)  # not an image, but part of the archive's bytes
        os.utime(archive, ns=(1_600_000_000 * 10**9,) * 2)  # same size and mtime both times
        keys.append(folder_dm(archive, tmp_path / "cache").cache_path())
    assert keys[0] != keys[1], "zips are keyed by content, whatever their mtime"


CORRUPTIONS = {
    "truncated": lambda p, m: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p, m: p.write_bytes(b"\0" * 64),
    "empty": lambda p, m: p.write_bytes(b""),
    "not-a-dict": lambda p, m: torch.save(torch.zeros(3), p),
    "missing-key": lambda p, m: torch.save({k: v for k, v in torch.load(p).items() if k != "images"}, p),
    "wrong-dtype": lambda p, m: torch.save({**torch.load(p), "images": torch.load(p)["images"].float()}, p),
    "wrong-shape": lambda p, m: torch.save({**torch.load(p), "images": torch.load(p)["images"][:, :1]}, p),
    "pickled-code": lambda p, m: torch.save({"images": Evil(m)}, p),
    "raw-pickle": lambda p, m: p.write_bytes(pickle.dumps(Evil(m))),
}


def _assert_rebuilt_once(make, cache_path, expected, marker, recwarn) -> None:
    d = ready(make())
    rebuilt = [w for w in recwarn if re.search(r"(?s)cache .* is unreadable .*rebuilding it", str(w.message))]
    assert len(rebuilt) == 1, [str(w.message) for w in recwarn]
    assert str(cache_path) in str(rebuilt[0].message)
    np.testing.assert_array_equal(d.samplers["train"].images, expected)
    assert not marker.exists(), "pickled code in a cache must never run"
    assert leftovers(cache_path.parent) == []


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_omniglot_corrupt_cache_rebuilt_with_one_warning(tmp_path, recwarn, corrupt):
    root = make_omniglot(tmp_path / "root")
    d = ready(omniglot_dm(root, tmp_path / "cache"))
    marker = tmp_path / "pwned"
    CORRUPTIONS[corrupt](d.cache_path(), marker)
    recwarn.clear()
    _assert_rebuilt_once(lambda: omniglot_dm(root, tmp_path / "cache"), d.cache_path(),
                         d.samplers["train"].images, marker, recwarn)


@pytest.mark.parametrize("corrupt", ["truncated", "wrong-dtype", "missing-key", "pickled-code", "raw-pickle"])
def test_image_cache_corrupt_rebuilt_with_one_warning(tmp_path, recwarn, corrupt):
    folder = make_classes(tmp_path / "toy")
    d = ready(folder_dm(folder, tmp_path / "cache"))
    marker = tmp_path / "pwned"
    CORRUPTIONS[corrupt](d.cache_path(), marker)
    recwarn.clear()
    _assert_rebuilt_once(lambda: folder_dm(folder, tmp_path / "cache"), d.cache_path(),
                         d.samplers["train"].images, marker, recwarn)


def _payload(value: int) -> dict:
    return {"images": torch.full((4, 1, 8, 8), value, dtype=torch.uint8), "classes": ["a", "b"], "counts": [2, 2]}


def test_cache_write_interrupted_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "cache.pt"

    def dies_midway(obj, f):
        f.write(b"PK\3\4 half a cache")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_cache(path, _payload(1))
    assert list(tmp_path.iterdir()) == []


def test_concurrent_cache_builders_never_expose_a_partial_cache(tmp_path, monkeypatch):
    """Two DDP ranks (or two nodes on a shared file system, where pids may coincide) building the same cache: each
    writes a temporary file of its own and renames it, so readers see no file or a whole one."""
    path, stop, seen, errors, temporaries = tmp_path / "cache.pt", threading.Event(), set(), [], []
    replace = os.replace

    def recording_replace(src, dst):
        temporaries.append(str(src))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)

    def build(value: int) -> None:
        for _ in range(15):
            save_cache(path, _payload(value))

    def read() -> None:
        while not stop.is_set():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                payload = load_cache(path, "test")
            errors.extend(str(w.message) for w in caught)
            if payload is not None:
                seen.add(int(payload["images"][0, 0, 0, 0]))

    reader = threading.Thread(target=read)
    reader.start()
    builders = [threading.Thread(target=build, args=(v,)) for v in (1, 2)]
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    stop.set()
    reader.join()
    assert errors == [] and seen <= {1, 2}
    assert len(set(temporaries)) == len(temporaries) == 30, "every write needs a temporary file of its own"
    assert int(load_cache(path, "test")["images"][0, 0, 0, 0]) in (1, 2)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ pickles


@pytest.mark.parametrize("payload", [
    b"EVIL",
    b"cbuiltins\nexec\n(S'open(\"/tmp/never\", \"w\")'\ntR.",
    b"csubprocess\ncheck_call\n((S'touch'\nS'/tmp/never'\nltR.",
    b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__subclasses__'\ntR.",
    b"cnumpy\nload\n(S'/tmp/never.npy'\ntR.",
], ids=["os.system", "exec", "subprocess", "getattr", "numpy.load"])
def test_restricted_unpickler_refuses_code(tmp_path, payload):
    path, marker = tmp_path / "evil.pkl", tmp_path / "never"
    path.write_bytes(pickle.dumps(Evil(marker)) if payload == b"EVIL" else payload.replace(b"/tmp/never",
                                                                                           str(marker).encode()))
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl: refused global"):
        safe_load(path)
    assert not (tmp_path / "never").exists()
