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
import urllib.request

from tqdm.auto import tqdm

DEFAULT_URL = "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt"
DEFAULT_OUT = os.path.join("models", "ldm", "cin256-v2", "model.ckpt")
CHUNK = 1 << 20


class DownloadError(Exception):
    """A download that failed; the message is one line."""


def _reason(e):
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"{e.reason} (is the network reachable?)"
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


def download(url, out, timeout=60, progress=True):
    """Fetch url into out via out + '.partial'; returns the number of bytes in the finished file."""
    partial = out + ".partial"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        have = os.path.getsize(partial) if os.path.exists(partial) else 0
        response = _open(url, have, timeout)
        if response is None:
            os.replace(partial, out)
            return have
        with response:
            if have and response.status != 206:
                have = 0  # the server ignored the Range header: start again
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(partial, "ab" if have else "wb") as f, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=os.path.basename(out), disable=not progress) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        size = os.path.getsize(partial)
        if total is not None and size != total:
            raise DownloadError(f"download of {url} stopped at {size} of {total} bytes; run again to resume")
        os.replace(partial, out)
        return size
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        kept = f"; {partial} is kept, run again to resume" if os.path.exists(partial) else ""
        raise DownloadError(f"cannot download {url}: {_reason(e)}{kept}") from None


def main(argv=None):
    args = parse_args(argv)
    if os.path.exists(args.out) and not args.force:
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=DEFAULT_URL, help="where to download from")
    p.add_argument("--out", default=DEFAULT_OUT, help="where to save the checkpoint")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the server")
    p.add_argument("--force", action="store_true", help="download even if --out exists")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
