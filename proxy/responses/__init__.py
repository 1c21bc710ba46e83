"""The Responses API (`POST /v1/responses`) as a thin translation around the chat walk.

* `translate(payload)`: the Responses request as the chat request every
  provider already takes, plus the `Echo` its `Response` objects repeat;
  what needs a store or OpenAI's own tools is a 400 naming the field.
* `from_completion(completion, echo)`: a whole chat completion as a `Response`.
* `ResponsesStream`: a pure encoder from chat chunks to Responses events.
* `responses_events(chat_sse, encoder)`: the stop-gap that re-encodes today's
  relayed chat stream (see `relayed`).
"""

from __future__ import annotations

from proxy.responses.answer import from_completion, new_id, usage_of
from proxy.responses.events import ResponsesStream
from proxy.responses.relayed import responses_events
from proxy.responses.request import Echo, translate

__all__ = ["Echo", "ResponsesStream", "from_completion", "new_id", "responses_events", "translate", "usage_of"]
