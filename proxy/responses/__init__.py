"""The Responses API (`POST /v1/responses`) as a thin translation around the chat walk.

* `translate(payload)`: the Responses request as the chat request every
  provider already takes, plus the `Echo` its `Response` objects repeat;
  what needs a store or OpenAI's own tools is a 400 naming the field.
* `from_completion(completion, echo)`: a whole chat completion as a `Response`.
* `ResponsesStream`: a pure encoder from chat chunks to Responses events, and
  `ResponsesEncoder`, the same as a stream session's wire format.
"""

from __future__ import annotations

from proxy.responses.answer import from_completion, new_id, usage_of
from proxy.responses.encoder import ResponsesEncoder
from proxy.responses.events import ResponsesStream
from proxy.responses.request import Echo, translate

__all__ = ["Echo", "ResponsesEncoder", "ResponsesStream", "from_completion", "new_id", "translate", "usage_of"]
