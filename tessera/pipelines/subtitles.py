"""Subtitle files as they are published beside videos: SubRip (`.srt`) and WebVTT (`.vtt`), parsed
with `pysubs2` (markup such as `<i>` dropped, line breaks joined), and this project's own
`<stem>.json` sidecar (`{"subtitles": [{start, end, text}]}`, seconds).

A subtitle is `{"start": s, "end": s, "text": str}` (seconds, float).
"""

from __future__ import annotations

import json

from tessera.pipelines.images import Rejected

EXTENSIONS = ("srt", "vtt", "json")
"""Sidecar extensions, in the order one is chosen when a video has several."""


def parse(data: bytes, name: str) -> list[dict]:
    """The subtitles of one sidecar file named `name` (its extension picks the format). Raises Rejected."""
    ext = name.rsplit(".", 1)[-1].lower()
    text = data.decode("utf-8-sig", errors="replace")
    if ext == "json":
        try:
            sidecar = json.loads(text)
        except json.JSONDecodeError as e:
            raise Rejected("malformed_document", f"subtitle sidecar {name} is not JSON: {e}") from e
        return from_sidecar(sidecar, name)
    import pysubs2

    try:
        subs = pysubs2.SSAFile.from_string(text, format_=ext)
    except Exception as e:  # pysubs2 raises its own FormatError / UnknownFormatIdentifierError / ValueError
        raise Rejected("malformed_document", f"subtitle file {name} is not valid {ext.upper()}: {e}") from e
    events = [{"start": ev.start / 1000.0, "end": ev.end / 1000.0, "text": " ".join(ev.plaintext.split())}
              for ev in subs if not ev.is_comment]
    if text.strip() and not events and not (ext == "vtt" and text.strip() == "WEBVTT"):
        raise Rejected("malformed_document", f"subtitle file {name} holds no {ext.upper()} cues")
    return [e for e in events if e["text"]]


def from_sidecar(sidecar, name: str) -> list[dict]:
    """The `subtitles` list of a JSON sidecar, or a reject that names the fields the file does have."""
    if not isinstance(sidecar, dict) or ("subtitles" not in sidecar and sidecar):
        found = sorted(sidecar) if isinstance(sidecar, dict) else type(sidecar).__name__
        raise Rejected("malformed_document", f"subtitle sidecar {name} has fields {found}, expected 'subtitles' "
                                             "(a list of {start, end, text})")
    subs = sidecar.get("subtitles", [])
    if not isinstance(subs, list) or any(not isinstance(s, dict) or "text" not in s or "start" not in s for s in subs):
        raise Rejected("malformed_document", f"subtitle sidecar {name}: 'subtitles' must be a list of {{start, end, text}}")
    return subs
