"""scripts/download_model.py against a local server: cut downloads, an --out that is a folder, failures."""
import functools
import http.server
import threading

import pytest

from conftest import load_script

download_model = load_script("scripts/download_model.py")
PAYLOAD = b"PK\x03\x04" + bytes(range(256)) * 40  # begins as a zip archive, as a PyTorch checkpoint does


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /model.ckpt (elsewhere 404), honouring `Range: bytes=N-` unless told not to; records each
    start offset. The first response stops after `cut` bytes (the connection closes); Content-Length is sent only
    if `announce`."""

    def __init__(self, state, *args, **kwargs):
        self.state = state
        super().__init__(*args, **kwargs)

    def do_GET(self):
        state = self.state
        if self.path != "/model.ckpt":
            self.send_error(404)
            return
        start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").rstrip("-"))
        start = start if state["ranges"] else 0
        state["starts"].append(start)
        if start >= len(PAYLOAD):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        if state["announce"]:
            self.send_header("Content-Length", str(len(PAYLOAD) - start))
        self.end_headers()
        body = PAYLOAD[start:]
        if len(state["starts"]) == 1 and state["cut"] is not None:
            body = body[:state["cut"]]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(announce=True, cut=None, ranges=True):
    """A local server of PAYLOAD (see _Handler): (url, the start offsets it was asked for, its shutdown)."""
    state = {"announce": announce, "cut": cut, "ranges": ranges, "starts": []}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, state))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def shutdown():
        httpd.shutdown()
        httpd.server_close()
    return f"http://127.0.0.1:{httpd.server_address[1]}/model.ckpt", state["starts"], shutdown


@pytest.fixture
def server():
    """serve(...) with the servers shut down after the test."""
    shutdowns = []

    def start(**options):
        url, starts, shutdown = serve(**options)
        shutdowns.append(shutdown)
        return url, starts
    yield start
    for shutdown in shutdowns:
        shutdown()


def last_error(capsys):
    """The error line (after any progress bar) on stderr."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def test_cut_download_of_unannounced_size_is_kept_to_resume(server, tmp_path, capsys):
    url, starts = server(announce=False, cut=4000)
    out = tmp_path / "model.ckpt"
    assert download_model.main(["--url", url, "--out", str(out)]) == 1
    assert f"download of {url} stopped at 4000 bytes; run again to resume" in last_error(capsys)
    assert not out.exists() and out.with_name("model.ckpt.partial").read_bytes() == PAYLOAD[:4000]
    assert starts == [0, 4000]  # asked the server whether its file ends there
    assert download_model.main(["--url", url, "--out", str(out)]) == 0  # resumes; the 206 announces the size
    assert out.read_bytes() == PAYLOAD and starts == [0, 4000, 4000]
    assert not out.with_name("model.ckpt.partial").exists()


def test_whole_download_of_unannounced_size_is_saved(server, tmp_path):
    url, starts = server(announce=False)
    out = tmp_path / "model.ckpt"
    assert download_model.download(url, str(out), progress=False) == len(PAYLOAD)
    assert out.read_bytes() == PAYLOAD and starts == [0, len(PAYLOAD)]  # the server has nothing after the end


def test_server_without_ranges_cannot_confirm_and_is_trusted(server, tmp_path):
    """The documented choice: a server that neither announces the size nor takes Range requests cannot tell."""
    url, starts = server(announce=False, ranges=False)
    out = tmp_path / "model.ckpt"
    assert download_model.download(url, str(out), progress=False) == len(PAYLOAD)
    assert out.read_bytes() == PAYLOAD and starts == [0, 0]


def test_resumed_download_checked_against_content_range(server, tmp_path):
    """A 206 without Content-Length still announces the whole size in Content-Range: a cut one is not saved."""
    url, starts = server(announce=False, cut=3000)
    out = tmp_path / "model.ckpt"
    out.with_name("model.ckpt.partial").write_bytes(PAYLOAD[:1000])
    with pytest.raises(download_model.DownloadError, match=f"stopped at 4000 of {len(PAYLOAD)} bytes"):
        download_model.download(url, str(out), progress=False)
    assert not out.exists() and starts == [1000]


@pytest.mark.parametrize("force", [False, True])
def test_out_that_is_a_directory_is_bad_input(server, tmp_path, capsys, force):
    url, starts = server()
    assert download_model.main(["--url", url, "--out", str(tmp_path), *(["--force"] if force else [])]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: --out {tmp_path} is a directory; " \
                                                  "give the checkpoint's file name\n"
    assert starts == [] and list(tmp_path.iterdir()) == []


def test_failed_download_removes_the_folders_it_made(server, tmp_path, capsys):
    url, _ = server()
    missing = url.replace("model.ckpt", "absent.ckpt")
    assert download_model.main(["--url", missing, "--out", str(tmp_path / "a" / "b" / "model.ckpt")]) == 1
    assert last_error(capsys) == f"error: cannot download {missing}: HTTP 404 Not Found"
    assert list(tmp_path.iterdir()) == []


def test_cut_download_keeps_its_folders(server, tmp_path, capsys):
    url, _ = server(cut=100)
    out = tmp_path / "a" / "b" / "model.ckpt"
    assert download_model.main(["--url", url, "--out", str(out)]) == 1
    assert "run again to resume" in last_error(capsys)
    assert [p.name for p in out.parent.iterdir()] == ["model.ckpt.partial"]


def test_missing_local_file_has_no_network_hint(tmp_path, capsys):
    source = tmp_path / "absent.ckpt"
    assert download_model.main(["--url", source.as_uri(), "--out", str(tmp_path / "out" / "model.ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot download {source.as_uri()}: ") and err.count("\n") == 1
    assert "No such file" in err and "network" not in err
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_keeps_the_network_hint(tmp_path):
    with pytest.raises(download_model.DownloadError, match=r"\(is the network reachable\?\)"):
        download_model.download("http://127.0.0.1:9/model.ckpt", str(tmp_path / "model.ckpt"), progress=False)


@pytest.mark.parametrize("head", [b"<!DOCTYPE html><html>sign in first</html>", b"\x00" * 64])
def test_a_download_that_is_no_checkpoint_is_not_saved(tmp_path, capsys, head):
    """A server (or a proxy's login page) that sends something else: an error, and nothing saved or kept."""
    source = tmp_path / "page.html"
    source.write_bytes(head)
    out = tmp_path / "out" / "model.ckpt"
    assert download_model.main(["--url", source.as_uri(), "--out", str(out)]) == 1
    assert last_error(capsys) == (f"error: {source.as_uri()} sent {len(head)} bytes that are not a PyTorch checkpoint "
                                  "(a zip, pickle or .safetensors file); nothing was saved")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("head, saved", [(b"\x80\x02}q\x00", True), (b"\x08\x00\x00\x00\x00\x00\x00\x00{}", True),
                                         (b"PK\x03\x04rest", True), (b"hello", False)])
def test_checkpoint_formats_are_recognised(tmp_path, head, saved):
    """A pickle (PyTorch before its zip format), a .safetensors header, a zip: saved; other bytes: refused."""
    source = tmp_path / "source.bin"
    source.write_bytes(head)
    if saved:
        assert download_model.download(source.as_uri(), str(tmp_path / "m.ckpt"), progress=False) == len(head)
    else:
        with pytest.raises(download_model.DownloadError, match="not a PyTorch checkpoint"):
            download_model.download(source.as_uri(), str(tmp_path / "m.ckpt"), progress=False)


def test_existing_out_that_is_no_checkpoint_is_bad_input(server, tmp_path, capsys):
    url, starts = server()
    out = tmp_path / "model.ckpt"
    out.write_text("not a checkpoint")
    assert download_model.main(["--url", url, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out} exists but is not a PyTorch checkpoint; --force downloads it again\n"
    assert starts == []
    assert download_model.main(["--url", url, "--out", str(out), "--force"]) == 0
    assert out.read_bytes() == PAYLOAD


@pytest.mark.parametrize("flags, message", [
    (["--timeout", "0"], "error: --timeout must be a positive number of seconds, not 0.0 (see --help)"),
    (["--timeout", "nan"], "error: --timeout must be a positive number of seconds, not nan (see --help)"),
    (["--timeout", "x"], "error: argument --timeout: invalid float value: 'x' (see --help)"),
    (["--out", "{tmp}/afile/model.ckpt"], "error: --out {tmp}/afile/model.ckpt: {tmp}/afile is a file, not a folder"),
])
def test_bad_flags_are_one_line(server, tmp_path, capsys, flags, message):
    url, starts = server()
    (tmp_path / "afile").write_text("")
    try:
        status = download_model.main(["--url", url, *[f.format(tmp=tmp_path) for f in flags]])
    except SystemExit as e:
        status = e.code
    assert status == 2 and capsys.readouterr().err == message.format(tmp=tmp_path) + "\n"
    assert starts == [] and [p.name for p in tmp_path.iterdir()] == ["afile"]
