"""Images referenced by URL (OBELICS / MMC4 documents), fetched the way a crawl must be: bounded,
retried, timed out, cached, every failure named.

`requests` with `urllib3`'s `Retry` does the HTTP: `retries` more attempts after the first on a
timeout, a dropped connection, 429 or 5xx (so a server sees one URL at most `retries + 1` times),
exponential backoff, never a retry on 404. A thread pool of `max_concurrency` per normalisation task
bounds the parallel requests; Ray bounds the tasks.

Outcomes (`Fetched.reason`, the reject reasons of the document that needs the image):
    None            the bytes are an image PIL can identify
    http_404        404 / 410
    timeout         no response within `timeout_s` on every attempt
    not_an_image    a response that is not an image (an HTML error page, a truncated file)
    download_failed anything else: other HTTP statuses after the retries, refused connections, DNS,
                    responses over `max_bytes`, schemes other than http(s)

The cache (`DownloadConfig.cache`, any `tessera.storage` location) keeps each URL's bytes and each
permanent failure (404, not an image) under the SHA-1 of the URL, so a re-run, or a run resumed after
a kill, does not download again; timeouts and other transient failures are tried again next run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json

from tessera import storage
from tessera.config import DownloadConfig

PERMANENT = ("http_404", "not_an_image")


@dataclasses.dataclass
class Fetched:
    url: str
    data: bytes | None
    reason: str | None = None
    detail: str = ""
    cached: bool = False


def _cache_paths(cache: str, url: str) -> tuple[str, str]:
    h = hashlib.sha1(url.encode()).hexdigest()
    base = storage.join(cache, h[:2], h)
    return base + ".bin", base + ".fail.json"


def _session(cfg: DownloadConfig):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(total=cfg.retries, connect=cfg.retries, read=cfg.retries, status=cfg.retries, other=0,
                  backoff_factor=cfg.backoff_s, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=frozenset({"GET"}), raise_on_status=False, respect_retry_after_header=False)
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=cfg.max_concurrency, pool_maxsize=cfg.max_concurrency)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "tessera-prepare (+https://github.com/tessera; img2dataset-compatible)"
    return session


def _is_image(data: bytes) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def _timed_out(error: BaseException) -> bool:
    import requests
    from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, ReadTimeoutError

    if isinstance(error, requests.exceptions.Timeout):
        return True
    cause = error.args[0] if error.args else None
    if isinstance(cause, MaxRetryError):
        cause = cause.reason
    return isinstance(cause, (ReadTimeoutError, ConnectTimeoutError))


def _get(session, url: str, cfg: DownloadConfig) -> Fetched:
    import requests

    if not url.lower().startswith(("http://", "https://")):
        return Fetched(url, None, "download_failed", f"{url!r}: only http(s) URLs are downloaded")
    try:
        with session.get(url, timeout=cfg.timeout_s, stream=True) as response:
            if response.status_code in (404, 410):
                return Fetched(url, None, "http_404", f"{url}: HTTP {response.status_code}")
            if response.status_code != 200:
                return Fetched(url, None, "download_failed", f"{url}: HTTP {response.status_code} after {cfg.retries} retries")
            data = bytearray()
            for chunk in response.iter_content(64 * 1024):
                data += chunk
                if len(data) > cfg.max_bytes:
                    return Fetched(url, None, "download_failed", f"{url}: larger than max_bytes {cfg.max_bytes}")
            content_type = response.headers.get("Content-Type", "?")
    except requests.exceptions.RequestException as e:
        if _timed_out(e):
            return Fetched(url, None, "timeout", f"{url}: no response within {cfg.timeout_s} s on {cfg.retries + 1} attempts")
        return Fetched(url, None, "download_failed", f"{url}: {type(e).__name__}: {str(e)[:300]}")
    if not _is_image(bytes(data)):
        return Fetched(url, None, "not_an_image", f"{url}: {len(data)} bytes of {content_type} that are not an image")
    return Fetched(url, bytes(data))


class Downloader:
    """Fetch many URLs at once through the cache. Not picklable (a session): make one per task."""

    def __init__(self, cfg: DownloadConfig, cache: str):
        self.cfg, self.cache = cfg, cache
        self._session = None

    def _one(self, url: str) -> Fetched:
        ok_path, fail_path = _cache_paths(self.cache, url)
        if storage.exists(ok_path):
            return Fetched(url, storage.read_bytes(ok_path), cached=True)
        if storage.exists(fail_path):
            fail = storage.read_json(fail_path)
            return Fetched(url, None, fail["reason"], fail["detail"] + " (cached outcome)", cached=True)
        if self._session is None:
            self._session = _session(self.cfg)
        got = _get(self._session, url, self.cfg)
        if got.data is not None:
            storage.write_bytes(ok_path, got.data)
        elif got.reason in PERMANENT:
            storage.write_bytes(fail_path, json.dumps({"url": url, "reason": got.reason, "detail": got.detail}).encode())
        return got

    def fetch(self, urls: list[str]) -> dict[str, Fetched]:
        """{url: Fetched} for the distinct URLs, at most `max_concurrency` requests in flight."""
        distinct = list(dict.fromkeys(urls))
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, max(1, len(distinct)))) as pool:
            return dict(zip(distinct, pool.map(self._one, distinct)))

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
