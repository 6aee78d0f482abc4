"""Stop strings: find them in growing output text, across token boundaries.

The output processor calls `find_stop_string` after each detokenized chunk with the full
text so far; only matches that end inside the new chunk are looked for, so the cost per
step depends on the chunk and the stop strings, not on the text length. For streaming,
`stop_holdback_len` says how much of the tail to keep back because it may turn out to be
the start of a stop string that must not be shown.
"""

from __future__ import annotations


def find_stop_string(
    text: str, new_text_len: int, stop: list[str], include_in_output: bool
) -> tuple[str, int] | None:
    """Finds the first stop string completed by the last `new_text_len` chars of `text`.

    Searches only where a match could be new (the last new_text_len + max(len(s)) - 1
    chars). "First" means the match that ends earliest, as if the text had arrived one
    character at a time, so the answer does not depend on how the text was split into
    chunks; among matches ending at the same place the longest wins.

    Returns (the stop string matched, the length to truncate the text to) or None. The
    length cuts just before the stop string, or just after it when `include_in_output`.

    Raises ValueError if `new_text_len` is outside [0, len(text)] or a stop string is empty.
    """
    if not 0 <= new_text_len <= len(text):
        raise ValueError(f"new_text_len must be in [0, {len(text)}], got {new_text_len}")
    best: tuple[int, int, str] | None = None  # (match end, match start, stop string)
    old_len = len(text) - new_text_len
    for stop_str in stop:
        if not stop_str:
            raise ValueError("stop strings must be non-empty")
        # The match must end past old_len, so it starts no earlier than this.
        start = text.find(stop_str, max(0, old_len - len(stop_str) + 1))
        if start < 0:
            continue
        candidate = (start + len(stop_str), start, stop_str)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    if best is None:
        return None
    end, start, stop_str = best
    return stop_str, end if include_in_output else start


def stop_holdback_len(text: str, stop: list[str]) -> int:
    """How many trailing chars of text could be the start of a stop string.

    That is the longest suffix of `text` that is a proper prefix of some stop string
    (a complete stop string is `find_stop_string`'s business). A streaming response holds
    these chars back until the next chunk shows whether the stop string follows.
    """
    longest = 0
    for stop_str in stop:
        # Only suffixes longer than the best so far can improve it.
        for length in range(min(len(stop_str) - 1, len(text)), longest, -1):
            if text.endswith(stop_str[:length]):
                longest = length
                break
    return longest
