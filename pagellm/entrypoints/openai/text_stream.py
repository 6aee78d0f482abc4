"""Streaming deltas from cumulative outputs, never showing half a stop string.

The engine reports each sequence's whole text so far and cuts it at a stop string only
once the stop string is complete. A streamer must therefore hold back any tail that could
still grow into a stop string: if " Paris" is sent and the stop string turns out to be
"Paris.", the client has already seen text that the final answer does not contain.
"""

from __future__ import annotations

from pagellm.engine.stop_strings import stop_holdback_len
from pagellm.sampling_params import SamplingParams


class TextDeltaStream:
    """Turns one sequence's cumulative text into the new text to send at each step."""

    def __init__(self, params: SamplingParams) -> None:
        # With include_stop_str_in_output the stop string is part of the answer anyway.
        self._stop = [] if params.include_stop_str_in_output else list(params.stop or [])
        self.sent = 0  # characters of the text already sent

    def delta(self, text: str, finished: bool) -> str:
        """The part of `text` not sent yet, minus a tail that might start a stop string.

        Once `finished`, the text is final (already cut at the stop string): all of the
        remainder is returned.
        """
        end = len(text)
        if not finished and self._stop:
            end -= stop_holdback_len(text, self._stop)
        if end <= self.sent:
            return ""
        piece = text[self.sent:end]
        self.sent = end
        return piece
