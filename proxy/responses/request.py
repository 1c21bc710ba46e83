"""A Responses API request as the chat-completions request every provider already takes.

Pure: `translate(payload)` returns the chat body and the `Echo` (what the
`Response` object repeats back), or raises an OpenAI-shaped 400 naming the
field it cannot honour. The proxy keeps no store, so what needs one
(`previous_response_id`, `conversation`, `store: true`, `background: true`,
stored `prompt`s, `item_reference`s) is refused, as are the tools OpenAI runs
itself (web search, file search, code interpreter, computer use, ...): no
provider behind a chat endpoint can run them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from proxy.errors import InvalidRequest

Echo = dict[str, Any]
"""The request's fields as every `Response` object of it shows them."""

NO_STORE: Final = "this proxy keeps no conversation store: send the whole conversation in `input`"
_STATEFUL: Final[dict[str, str]] = {
    "previous_response_id": NO_STORE,
    "conversation": NO_STORE,
    "prompt": "stored prompt templates live at OpenAI; send `instructions` and `input` instead",
}
_ONLY_FALSE: Final[dict[str, str]] = {
    "store": "this proxy stores no responses (retrieval needs a store); send `store: false` or leave it out",
    "background": "background responses need a store to poll; this proxy answers within the request",
}
# `include` values that ask for nothing this proxy could hold back: no reasoning is encrypted here.
_INCLUDABLE: Final = frozenset({"reasoning.encrypted_content"})
# Responses fields read here (or refused above); any other field goes on to the chat request as is.
_OWN_FIELDS: Final = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "text",
        "reasoning",
        "max_output_tokens",
        "metadata",
        "include",
        "stream",
        "stream_options",
        "truncation",
        "max_tool_calls",
        "parallel_tool_calls",
        "top_logprobs",
        "prompt_cache_retention",
        "prompt_cache_options",
        "context_management",
        *_STATEFUL,
        *_ONLY_FALSE,
    }
)
_PASSED_ON: Final = ("temperature", "top_p", "user", "safety_identifier", "prompt_cache_key", "service_tier")
_TOOL_CHOICES: Final = frozenset({"auto", "none", "required"})
_ROLES: Final = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def refuse(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"'{param}' is not supported by this proxy: {why}.", param=param, code="unsupported_parameter"
    )


def invalid(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}' {what}.", param=param)


def translate(payload: dict[str, Any]) -> tuple[dict[str, Any], Echo]:
    """The chat body for this Responses request, and its echo."""
    _refuse_state(payload)
    tools = _tools(payload.get("tools"))
    chat: dict[str, Any] = {key: value for key, value in payload.items() if key not in _OWN_FIELDS}
    chat["messages"] = _messages(payload)
    for key in _PASSED_ON:
        if payload.get(key) is not None:
            chat[key] = payload[key]
    _numbers(payload)
    if tools:
        chat["tools"] = [_chat_tool(tool) for tool in tools]
        if isinstance(payload.get("parallel_tool_calls"), bool):
            chat["parallel_tool_calls"] = payload["parallel_tool_calls"]
    if payload.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(payload["tool_choice"])
    if payload.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = payload["max_output_tokens"]
    _text(payload.get("text"), chat)
    _reasoning(payload.get("reasoning"), chat)
    return chat, _echo(payload, tools)


# -- what needs a store, or OpenAI's own tools -------------------------------------------------


def _refuse_state(payload: dict[str, Any]) -> None:
    for key, why in _STATEFUL.items():
        if payload.get(key) is not None:
            raise refuse(key, why)
    for key, why in _ONLY_FALSE.items():
        value = payload.get(key)
        if value is not None and value is not False:
            raise refuse(key, why)
    if payload.get("top_logprobs") is not None:
        raise refuse("top_logprobs", "log probabilities are not translated from the providers")
    include = payload.get("include")
    if include is None:
        return
    if not isinstance(include, list) or not all(isinstance(value, str) for value in include):
        raise invalid("include", "must be an array of strings")
    for value in include:
        if value not in _INCLUDABLE:
            raise refuse("include", f"'{value}' needs OpenAI's built-in tools or stored files")


def _numbers(payload: dict[str, Any]) -> None:
    for key in ("temperature", "top_p"):
        value = payload.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise invalid(key, "must be a number")
    limit = payload.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise invalid("max_output_tokens", "must be a positive integer")
    if payload.get("parallel_tool_calls") is not None and not isinstance(payload["parallel_tool_calls"], bool):
        raise invalid("parallel_tool_calls", "must be a boolean")
    metadata = payload.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values())
    ):
        raise invalid("metadata", "must be an object of string values")


# -- input ---------------------------------------------------------------------------------------


def _messages(payload: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = payload.get("instructions")
    if isinstance(instructions, str):
        if instructions:
            messages.append({"role": "system", "content": instructions})
    elif isinstance(instructions, list):
        _items(instructions, "instructions", messages)
    elif instructions is not None:
        raise invalid("instructions", "must be a string")
    value = payload.get("input")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
    elif isinstance(value, list):
        _items(value, "input", messages)
    else:
        raise InvalidRequest("'input' must be a string or an array of input items.", param="input")
    if not messages:
        raise InvalidRequest("'input' must not be empty.", param="input")
    return messages


def _items(items: list[Any], where: str, messages: list[dict[str, Any]]) -> None:
    for index, item in enumerate(items):
        path = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise invalid(path, "must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        handler = _ITEM_HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            raise _unsupported_item(path, kind)
        handler(item, path, messages)


def _unsupported_item(path: str, kind: object) -> InvalidRequest:
    if kind == "item_reference":
        return refuse(f"{path}.type", f"item references need a stored conversation ({NO_STORE})")
    if isinstance(kind, str):
        return refuse(f"{path}.type", f"'{kind}' items belong to OpenAI's built-in tools")
    return invalid(f"{path}.type", "must name an input item type (message, function_call, function_call_output)")


def _message(item: dict[str, Any], path: str, messages: list[dict[str, Any]]) -> None:
    given = item.get("role")
    role = _ROLES.get(given) if isinstance(given, str) else None
    if role is None:
        raise invalid(f"{path}.role", "must be one of user, assistant, system, developer")
    content = item.get("content")
    if isinstance(content, str):
        messages.append({"role": role, "content": content})
        return
    if not isinstance(content, list):
        raise invalid(f"{path}.content", "must be a string or an array of content parts")
    parts = [_part(part, f"{path}.content[{i}]") for i, part in enumerate(content)]
    if role == "assistant":  # history: plain text is what every provider takes for an assistant turn
        messages.append({"role": role, "content": "".join(str(p.get("text", "")) for p in parts)})
    else:
        messages.append({"role": role, "content": parts})


def _part(part: object, path: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise invalid(path, "must be an object")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": _string(part, "text", path)}
    if kind == "refusal":
        return {"type": "text", "text": _string(part, "refusal", path)}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise refuse(f"{path}.file_id", "images are sent by `image_url` (a URL or a data URL), not file ids")
        image: dict[str, Any] = {"url": url}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file = {key: part[key] for key in ("file_data", "file_id", "filename") if isinstance(part.get(key), str)}
        if "file_data" not in file and "file_id" not in file:
            raise refuse(f"{path}.file_url", "files are sent as `file_data` (or an OpenAI `file_id`)")
        return {"type": "file", "file": file}
    raise invalid(f"{path}.type", "must be input_text, input_image or input_file")


def _string(item: dict[str, Any], key: str, path: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid(f"{path}.{key}", "must be a string")
    return value


def _function_call(item: dict[str, Any], path: str, messages: list[dict[str, Any]]) -> None:
    call = {
        "id": _string(item, "call_id", path),
        "type": "function",
        "function": {"name": _string(item, "name", path), "arguments": _string(item, "arguments", path)},
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":  # one assistant turn: its text and its calls
        last.setdefault("tool_calls", []).append(call)
        if last.get("content") == "":
            last["content"] = None
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _function_call_output(item: dict[str, Any], path: str, messages: list[dict[str, Any]]) -> None:
    output = item.get("output")
    if isinstance(output, list):
        parts = [_part(part, f"{path}.output[{i}]") for i, part in enumerate(output)]
        output = "".join(str(part.get("text", "")) for part in parts)
    elif not isinstance(output, str):
        raise invalid(f"{path}.output", "must be a string or an array of content parts")
    messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", path), "content": output})


def _skip(item: dict[str, Any], path: str, messages: list[dict[str, Any]]) -> None:
    """Reasoning items: a provider's thoughts are not sent back to another (nor encrypted here)."""


_ITEM_HANDLERS: Final[dict[str, Callable[[dict[str, Any], str, list[dict[str, Any]]], None]]] = {
    "message": _message,
    "function_call": _function_call,
    "function_call_output": _function_call_output,
    "reasoning": _skip,
}


# -- tools, tool choice, text format, reasoning --------------------------------------------------


def _tools(value: object) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("tools", "must be an array of tools")
    for index, tool in enumerate(value):
        path = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise invalid(path, "must be an object")
        kind = tool.get("type")
        if kind != "function":
            raise refuse(
                f"{path}.type", f"'{kind}' tools run at OpenAI; tools of type 'function' (run by your code) work"
            )
        _string(tool, "name", path)
        if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
            raise invalid(f"{path}.parameters", "must be a JSON schema object")
    return value


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
    return {"type": "function", "function": function}


def _tool_choice(value: object) -> object:
    if isinstance(value, str):
        if value not in _TOOL_CHOICES:
            raise invalid("tool_choice", "must be auto, none, required or a function")
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    kind = value.get("type") if isinstance(value, dict) else None
    raise refuse("tool_choice", f"a choice of type '{kind}' is not translated; use auto, none, required or a function")


def _text(value: object, chat: dict[str, Any]) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise invalid("text", "must be an object")
    if isinstance(value.get("verbosity"), str):
        chat["verbosity"] = value["verbosity"]
    form = value.get("format")
    if form is None:
        return
    kind = form.get("type") if isinstance(form, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        chat["response_format"] = {"type": "json_object"}
        return
    if kind != "json_schema":
        raise invalid("text.format.type", "must be text, json_object or json_schema")
    assert isinstance(form, dict)
    if not isinstance(form.get("schema"), dict):
        raise invalid("text.format.schema", "must be a JSON schema object")
    schema = {key: form[key] for key in ("name", "schema", "strict", "description") if form.get(key) is not None}
    schema.setdefault("name", "response")
    chat["response_format"] = {"type": "json_schema", "json_schema": schema}


def _reasoning(value: object, chat: dict[str, Any]) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise invalid("reasoning", "must be an object")
    effort = value.get("effort")
    if effort is not None:
        if not isinstance(effort, str):
            raise invalid("reasoning.effort", "must be a string")
        chat["reasoning_effort"] = effort


# -- the echo ------------------------------------------------------------------------------------


def _echo(payload: dict[str, Any], tools: list[dict[str, Any]]) -> Echo:
    """What OpenAI's `Response` repeats of its request (defaults as OpenAI shows them)."""
    echo: Echo = {
        "instructions": payload.get("instructions"),
        "max_output_tokens": payload.get("max_output_tokens"),
        "max_tool_calls": payload.get("max_tool_calls"),
        "metadata": payload.get("metadata") or {},
        "parallel_tool_calls": payload.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": payload.get("reasoning") or {"effort": None, "summary": None},
        "store": False,
        "background": False,
        "temperature": payload.get("temperature"),
        "text": payload.get("text") or {"format": {"type": "text"}},
        "tool_choice": payload.get("tool_choice") or "auto",
        "tools": [_echo_tool(tool) for tool in tools],
        "top_p": payload.get("top_p"),
        "truncation": payload.get("truncation") or "disabled",
        "user": payload.get("user"),
    }
    for key in ("safety_identifier", "prompt_cache_key", "service_tier"):
        if payload.get(key) is not None:
            echo[key] = payload[key]
    return echo


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool["name"],
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }
