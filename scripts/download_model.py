"""Download the public LDM cin256-v2 checkpoint (class-conditional ImageNet-256), resuming a partial download.

The file is written to `<out>.partial` and renamed to `<out>` once complete; running the script again after
an interruption continues where it stopped (HTTP Range request).
"""
import argparse
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

from tqdm.auto import tqdm

DEFAULT_URL = "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt"
DEFAULT_OUT = os.path.join("models", "ldm", "cin256-v2", "model.ckpt")
CHUNK = 1 << 20
BAD_INPUT = 2


class DownloadError(Exception):
    """A download that failed; the message is one line."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error:` line (no usage block), exit status BAD_INPUT."""

    def error(self, message):
        self.exit(BAD_INPUT, f"error: {message} (see --help)\n")


def is_checkpoint(path):
    """Whether path starts as a PyTorch checkpoint does (a zip archive or a pickle) or a .safetensors file (an
    8-byte header size, then its JSON header): not an HTML page or other text a server sent instead."""
    with open(path, "rb") as f:
        head = f.read(9)
    return head.startswith((b"PK\x03\x04", b"\x80")) or head[8:9] == b"{"


def _reason(e, url):
    """One line on why fetching url failed; the network hint only for a network URL."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        local = urllib.parse.urlsplit(url).scheme in ("file", "")
        return f"{e.reason}" if local else f"{e.reason} (is the network reachable?)"
    return str(e) or type(e).__name__


def _open(url, start, timeout):
    """The response for url from byte `start` on; None when the file on the server ends exactly at start."""
    headers = {"User-Agent": "ldm-faster-diffusion-downloader"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not start:
            raise
        size = re.fullmatch(r"bytes \*/(\d+)", e.headers.get("Content-Range", ""))
        if size and int(size.group(1)) == start:
            return None
        raise DownloadError(f"{url} is shorter than {start} bytes already downloaded; delete the .partial file "
                            "and run again") from None


def _announced_size(response, have):
    """The whole file's size as the response announces it (a 206's Content-Range, else have + Content-Length),
    or None when it announces none."""
    whole = re.fullmatch(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
    if response.status == 206 and whole:
        return int(whole.group(1))
    length = response.headers.get("Content-Length")
    return have + int(length) if length is not None else None


def _server_confirms_end(url, size, timeout):
    """Whether the server confirms that its file ends at `size` bytes: a Range request from there finds nothing
    left (416). A server that ignores Range (200) cannot say, and is trusted; one with more bytes (206) is not."""
    response = _open(url, size, timeout)
    if response is None:
        return True
    with response:
        return response.status != 206


def _make_folders(folder):
    """Create folder and its missing parents; returns those created, deepest first."""
    created = []
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(created[0] if created else folder, exist_ok=True)
    return created


def _remove_empty(folders):
    """Remove the folders (deepest first) while they are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def _fetch(url, out, partial, timeout, progress):
    """Fetch url into partial (resuming it), check it is whole, rename it to out; returns its size."""
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    response = _open(url, have, timeout)
    if response is None:
        os.replace(partial, out)
        return have
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range header: start again
        total = _announced_size(response, have)
        with open(partial, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=os.path.basename(out), disable=not progress) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = os.path.getsize(partial)
    # A body of unannounced size ends when the server closes the connection, cut or not: it is whole only if it is
    # not empty and the server, asked for the bytes after it, has none (or cannot say, ignoring Range requests).
    if total is None and not (size and _server_confirms_end(url, size, timeout)):
        raise DownloadError(f"download of {url} stopped at {size} bytes; run again to resume")
    if total is not None and size != total:
        raise DownloadError(f"download of {url} stopped at {size} of {total} bytes; run again to resume")
    if not is_checkpoint(partial):
        os.remove(partial)
        raise DownloadError(f"{url} sent {size} bytes that are not a PyTorch checkpoint (a zip, pickle or "
                            ".safetensors file); nothing was saved")
    os.replace(partial, out)
    return size


def download(url, out, timeout=60, progress=True):
    """Fetch url into out via out + '.partial'; returns the number of bytes in the finished file. Folders it
    created are removed again if it fails before saving anything."""
    partial = out + ".partial"
    created = []
    try:
        created = _make_folders(os.path.dirname(os.path.abspath(out)))
        return _fetch(url, out, partial, timeout, progress)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        kept = f"; {partial} is kept, run again to resume" if os.path.exists(partial) else ""
        raise DownloadError(f"cannot download {url}: {_reason(e, url)}{kept}") from None
    finally:
        if not os.path.exists(partial) and not os.path.exists(out):
            _remove_empty(created)


def main(argv=None):
    args = parse_args(argv)
    problem = bad_out(args.out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return BAD_INPUT
    if os.path.exists(args.out) and not args.force:
        if not is_checkpoint(args.out):
            print(f"error: {args.out} exists but is not a PyTorch checkpoint; --force downloads it again",
                  file=sys.stderr)
            return BAD_INPUT
        print(f"{args.out} already exists (use --force to download it again)")
        return 0
    try:
        size = download(args.url, args.out, timeout=args.timeout)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; run again to resume from {args.out}.partial", file=sys.stderr)
        return 130
    print(f"saved {args.out} ({size / 2**30:.2f} GiB)")
    return 0


def bad_out(out):
    """Why --out cannot be written (a directory, or a file where a folder on its path should be), or None."""
    if os.path.isdir(out):
        return f"--out {out} is a directory; give the checkpoint's file name"
    folder = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return None if os.path.isdir(folder) else f"--out {out}: {folder} is a file, not a folder"


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=DEFAULT_URL, help="where to download from")
    p.add_argument("--out", default=DEFAULT_OUT, help="where to save the checkpoint")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the server")
    p.add_argument("--force", action="store_true", help="download even if --out exists")
    args = p.parse_args(argv)
    if not 0 < args.timeout < float("inf"):
        p.error(f"--timeout must be a positive number of seconds, not {args.timeout}")
    return args


if __name__ == "__main__":
    sys.exit(main())
