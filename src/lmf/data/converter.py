"""Convert raw records (alpaca / sharegpt / openai layouts) into one normalized shape.

Normalized record::

    {"_prompt": [{"role": "user"|"assistant"|"observation"|"function", "content": str}, ...],
     "_response": [{"role": "assistant"|"function", "content": str}, ...],  # 1 (sft) or 2: chosen, rejected
     "_system": str, "_tools": str, "_images": [path, ...], "_videos": [path, ...], "_audios": [path, ...]}

Videos and audio clips come from the ``videos`` / ``audios`` columns with ``<video>`` / ``<audio>`` placeholders,
checked the same way (PyAV opens them).
Images come from the dataset's ``images`` column (or OpenAI / v1 content parts of type ``image_url`` / ``image``,
which become ``<image>`` placeholders in the text); paths are resolved against ``media_dir``; each file must open
and the number of ``<image>`` placeholders must equal the number of images, else the record is malformed.

For stage ``kto`` (LLaMA-Factory's layout) ``_response`` is ``[answer, empty]`` when the record's ``kto_tag``
is true (a desirable answer) and ``[empty, answer]`` when it is false.

:func:`convert_record` returns ``(normalized, None)`` or ``(None, problem)`` where the problem names
the field; the caller adds the file and record index. Nothing is dropped here silently.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from lmf.data.layout import layout_of
from lmf.data.media import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from lmf.data.media.images import image_problem, resolve_media_path
from lmf.data.registry import DatasetAttr

USER, ASSISTANT, OBSERVATION, FUNCTION = "user", "assistant", "observation", "function"
EMPTY_ANSWER = {"role": ASSISTANT, "content": ""}


def _kto_response(record: dict, attr: DatasetAttr, answer: dict) -> list[dict]:
    """``[answer, empty]`` (desirable) or ``[empty, answer]`` (undesirable) from the record's ``kto_tag``."""
    key = attr.kto_tag
    if not key or key not in record:
        raise RecordProblem(f"field {key or 'kto_tag'!r} is missing (KTO data needs a true/false label per answer)")
    tag = record[key]
    if not isinstance(tag, bool):
        raise RecordProblem(f"field {key!r} must be true or false, got {tag!r}")
    return [answer, dict(EMPTY_ANSWER)] if tag else [dict(EMPTY_ANSWER), answer]


class RecordProblem(Exception):
    """A malformed record; ``str()`` names the field."""


def _text(value: Any, field: str, required: bool = True) -> str:
    if value is None:
        if required:
            raise RecordProblem(f"field {field!r} is missing")
        return ""
    if isinstance(value, (dict, list)):
        raise RecordProblem(f"field {field!r} must be a string, got {type(value).__name__}")
    return str(value)


def _tools_text(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    text = str(value)
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordProblem(f"field 'tools' is not valid JSON: {exc.msg}") from exc
    return text


def _require_response(messages: list[dict], field: str) -> None:
    for m in messages:
        if m["role"] in (ASSISTANT, FUNCTION) and not m["content"].strip():
            raise RecordProblem(f"field {field!r}: empty response")


def _alpaca(record: dict, attr: DatasetAttr, stage: str) -> dict:
    prompt: list[dict] = []
    if attr.history and record.get(attr.history):
        history = record[attr.history]
        if not isinstance(history, list):
            raise RecordProblem(f"field {attr.history!r} must be a list of [query, response] pairs")
        for turn, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise RecordProblem(f"field {attr.history!r}[{turn}] must be a [query, response] pair")
            prompt.append({"role": USER, "content": _text(pair[0], f"{attr.history}[{turn}][0]")})
            prompt.append({"role": ASSISTANT, "content": _text(pair[1], f"{attr.history}[{turn}][1]")})
    if attr.prompt not in record:
        raise RecordProblem(f"field {attr.prompt!r} is missing")
    query = [_text(record.get(attr.prompt), attr.prompt)]
    if attr.query and record.get(attr.query):
        query.append(_text(record[attr.query], attr.query))
    query_text = attr.query_join.join(q for q in query if q)
    layout = layout_of(stage)
    if not query_text.strip() and layout != "text":
        raise RecordProblem(f"field {attr.prompt!r} is empty")
    prompt.append({"role": USER, "content": query_text})
    response: list[dict] = []
    if layout == "pairwise":
        chosen_key, rejected_key = attr.chosen or "chosen", attr.rejected or "rejected"
        for key in (chosen_key, rejected_key):
            if key not in record:
                raise RecordProblem(f"field {key!r} is missing (preference data needs chosen and rejected)")
        response = [{"role": ASSISTANT, "content": _text(record[chosen_key], chosen_key)},
                    {"role": ASSISTANT, "content": _text(record[rejected_key], rejected_key)}]
        _require_response(response[:1], chosen_key)
        _require_response(response[1:], rejected_key)
    elif layout != "text":
        if attr.response not in record or record[attr.response] is None:
            raise RecordProblem(f"field {attr.response!r} is missing")
        response = [{"role": ASSISTANT, "content": _text(record[attr.response], attr.response)}]
        _require_response(response, attr.response)
        if layout == "feedback":
            response = _kto_response(record, attr, response[0])
    _require_response(prompt, attr.history or "history")
    system = _text(record.get(attr.system), attr.system, required=False) if attr.system else ""
    tools = _tools_text(record.get(attr.tools)) if attr.tools else ""
    return {"_prompt": prompt, "_response": response, "_system": system, "_tools": tools}


def _openai_message(msg: dict, attr: DatasetAttr, field: str, media: Optional[list] = None) -> tuple[str, str]:
    """(tag, content) of an OpenAI-style message; assistant tool_calls become a function message."""
    role = msg.get(attr.role_tag)
    if role == attr.assistant_tag and msg.get("tool_calls"):
        calls = []
        for call in msg["tool_calls"]:
            fn = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(fn, dict) or "name" not in fn:
                raise RecordProblem(f"field {field!r}: tool_calls entries need a function name")
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError as exc:
                    raise RecordProblem(f"field {field!r}: tool call arguments are not valid JSON: {exc.msg}") from exc
            calls.append({"name": fn["name"], "arguments": args})
        return attr.function_tag, json.dumps(calls if len(calls) > 1 else calls[0], ensure_ascii=False)
    content = msg.get(attr.content_tag)
    if isinstance(content, list):  # content parts: OpenAI's {type, text} or LLaMA-Factory v1's {type, value}
        content = _text_parts(content, field, media)
    weight = msg.get("loss_weight")
    if weight is not None:  # v1: 1 on the answers, 0 on the prompt (what lmf's masking does)
        expected = 1.0 if role == attr.assistant_tag else 0.0
        if float(weight) != expected:
            raise RecordProblem(f"field {field!r}: loss_weight {weight} on a {role!r} message is not implemented "
                                f"(answers train with 1, prompt messages with 0)")
    return role, content


def _part_image(part: dict, field: str) -> str:
    """The path of an image content part: OpenAI's ``{"type": "image_url", "image_url": {"url": ...}}``, or
    ``{"type": "image", "image" | "value" | "url": ...}`` (LLaMA-Factory v1)."""
    value = part.get("image_url", part.get("image", part.get("value", part.get("url"))))
    if isinstance(value, dict):
        value = value.get("url", value.get("path"))
    if not isinstance(value, str) or not value:
        raise RecordProblem(f"field {field!r}: an image part needs a file path (image_url.url)")
    if value.startswith(("http://", "https://")):
        raise RecordProblem(f"field {field!r}: image {value!r} is a remote URL; lmf reads local files only")
    return value[len("file://"):] if value.startswith("file://") else value


def _text_parts(parts: list, field: str, media: Optional[list] = None) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict):
            raise RecordProblem(f"field {field!r}: content parts must be objects")
        kind = part.get("type", "text")
        if kind in ("image_url", "image") and media is not None:
            media.append(_part_image(part, field))
            texts.append(IMAGE_PLACEHOLDER)
            continue
        if kind != "text":
            raise RecordProblem(f"field {field!r}: content of type {kind!r} is not implemented (text and image parts)")
        texts.append(str(part.get("text", part.get("value", ""))))
    return "".join(texts)


def _messages(raw: Any, attr: DatasetAttr, field: str, media: Optional[list] = None) -> tuple[list[dict], Optional[str]]:
    """Sharegpt/openai message list -> (messages with canonical roles, system text or None)."""
    if not isinstance(raw, list):
        raise RecordProblem(f"field {field!r} must be a list of messages, got {type(raw).__name__}")
    tag_to_role = {attr.user_tag: USER, attr.assistant_tag: ASSISTANT,
                   attr.observation_tag: OBSERVATION, attr.function_tag: FUNCTION}
    if attr.formatting in ("openai", "pair"):
        tag_to_role.setdefault("function", FUNCTION)
    system = None
    out = []
    for i, msg in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise RecordProblem(f"field {where!r} must be a message object")
        if attr.formatting in ("openai", "pair"):
            tag, content = _openai_message(msg, attr, where, media)
        else:
            tag, content = msg.get(attr.role_tag), msg.get(attr.content_tag)
        if tag is None:
            raise RecordProblem(f"field {where!r} has no {attr.role_tag!r}")
        if i == 0 and tag == attr.system_tag:
            system = _text(content, f"{where}.{attr.content_tag}", required=False)
            continue
        if tag not in tag_to_role:
            raise RecordProblem(f"field {where}.{attr.role_tag} is {tag!r}; expected one of {sorted(tag_to_role)}")
        out.append({"role": tag_to_role[tag], "content": _text(content, f"{where}.{attr.content_tag}")})
    return out, system


def _check_order(messages: list[dict], field: str, offset: int = 0) -> None:
    for i, m in enumerate(messages):
        expected = (USER, OBSERVATION) if (i + offset) % 2 == 0 else (ASSISTANT, FUNCTION)
        if m["role"] not in expected:
            raise RecordProblem(
                f"field {field!r}: wrong role order at message {i}: {m['role']!r} where {'/'.join(expected)} "
                "was expected (turns must alternate user, assistant)"
            )


def _sharegpt(record: dict, attr: DatasetAttr, stage: str, media: Optional[list] = None) -> dict:
    field = attr.messages
    if field not in record:
        raise RecordProblem(f"field {field!r} is missing")
    messages, system = _messages(record[field], attr, field, media)
    if system is None and attr.system and record.get(attr.system):  # a system message wins, as in LLaMA-Factory
        system = _text(record[attr.system], attr.system)
    if not messages:
        raise RecordProblem(f"field {field!r} has no messages")
    _check_order(messages, field)
    layout = layout_of(stage)
    if layout == "pairwise":
        chosen_key, rejected_key = attr.chosen or "chosen", attr.rejected or "rejected"
        if chosen_key in record and rejected_key in record:
            if len(messages) % 2 != 1:
                raise RecordProblem(f"field {field!r}: the prompt of preference data must end with a user turn")
            response = []
            for key in (chosen_key, rejected_key):
                value = record[key]
                if isinstance(value, dict):
                    msgs, _ = _messages([value], attr, key)
                    if msgs[0]["role"] not in (ASSISTANT, FUNCTION):
                        raise RecordProblem(f"field {key!r}: role {msgs[0]['role']!r}; expected an assistant message")
                    response.append(msgs[0])
                else:
                    response.append({"role": ASSISTANT, "content": _text(value, key)})
                _require_response(response[-1:], key)
            prompt = messages
        else:
            raise RecordProblem(f"field {chosen_key!r}/{rejected_key!r} is missing (preference data needs both)")
    elif layout == "text":
        prompt, response = messages[:1], []
    else:
        if len(messages) % 2 != 0:
            raise RecordProblem(f"field {field!r}: the conversation must end with an assistant turn")
        prompt, response = messages[:-1], messages[-1:]
        _require_response(messages, field)
        if layout == "feedback":
            response = _kto_response(record, attr, response[0])
    tools = _tools_text(record.get(attr.tools)) if attr.tools else ""
    return {"_prompt": prompt, "_response": response, "_system": system or "", "_tools": tools}


def _pair(record: dict, attr: DatasetAttr, stage: str, media: Optional[list] = None) -> dict:
    """v1 ``pair`` layout: chosen and rejected are full message lists sharing the same prompt."""
    chosen_key, rejected_key = attr.chosen or "chosen", attr.rejected or "rejected"
    convs = []
    system = None
    rejected_media: list = []  # the rejected list repeats the prompt's images: parsed, then checked equal
    for key in (chosen_key, rejected_key):
        if key not in record:
            raise RecordProblem(f"field {key!r} is missing (pair data needs chosen and rejected message lists)")
        messages, sys_text = _messages(record[key], attr, key, media if key == chosen_key else rejected_media)
        system = system if system is not None else sys_text
        if not messages:
            raise RecordProblem(f"field {key!r} has no messages")
        _check_order(messages, key)
        if len(messages) % 2 != 0:
            raise RecordProblem(f"field {key!r}: the conversation must end with an assistant turn")
        _require_response(messages[-1:], key)
        convs.append(messages)
    if convs[0][:-1] != convs[1][:-1]:
        raise RecordProblem(f"fields {chosen_key!r} and {rejected_key!r} must share the same prompt messages")
    if media is not None and rejected_media != media:
        raise RecordProblem(f"fields {chosen_key!r} and {rejected_key!r} must share the same images")
    if layout_of(stage) == "pairwise":
        prompt, response = convs[0][:-1], [convs[0][-1], convs[1][-1]]
    else:
        prompt, response = convs[0][:-1], convs[0][-1:]
    return {"_prompt": prompt, "_response": response, "_system": system or "", "_tools": ""}


def _column_media(record: dict, column: Optional[str]) -> list[str]:
    if not column or record.get(column) is None:
        return []
    value = record[column]
    values = value if isinstance(value, list) else [value]
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise RecordProblem(f"field {column!r}[{i}] must be a file path, got {type(v).__name__}")
    return list(values)


def _count(messages: list[dict], placeholder: str) -> int:
    return sum(m["content"].count(placeholder) for m in messages)


def _resolve_media(paths: list[str], column: str, problem_of, media_dir: Optional[str]) -> list[str]:
    """Absolute paths of a record's files, each checked by ``problem_of`` (a problem names the field and index)."""
    resolved = []
    for i, path in enumerate(paths):
        full = resolve_media_path(path, media_dir)
        problem = problem_of(full)
        if problem:
            raise RecordProblem(f"field {column!r}[{i}]: {problem}"
                                + (f" (relative paths are looked up in media_dir {media_dir!r})" if media_dir else ""))
        resolved.append(full)
    return resolved


def _attach_media(out: dict, record: dict, attr: DatasetAttr, stage: str, media_dir: Optional[str],
                  part_images: list[str]) -> dict:
    """``_images`` / ``_videos`` / ``_audios`` of the record, resolved and checked against its placeholders."""
    images = _column_media(record, attr.images) + part_images
    videos = _column_media(record, attr.videos)
    audios = _column_media(record, attr.audios)
    # placeholders of what one sample sees: the prompt and (preference data) its chosen answer
    messages = out["_prompt"] + out["_response"][:1]
    if layout_of(stage) == "feedback" and len(out["_response"]) == 2 and not out["_response"][0]["content"]:
        messages = out["_prompt"] + out["_response"][1:]
    found = _count(messages, IMAGE_PLACEHOLDER)
    if (attr.images or part_images) and found != len(images):  # a text dataset may say "<image>" literally
        raise RecordProblem(f"field {attr.images or 'images'!r}: {len(images)} image(s) but {found} "
                            f"{IMAGE_PLACEHOLDER} placeholder(s) in the messages; they must match")
    found = _count(messages, VIDEO_PLACEHOLDER)
    if attr.videos and found != len(videos):
        raise RecordProblem(f"field {attr.videos!r}: {len(videos)} video(s) but {found} {VIDEO_PLACEHOLDER} "
                            "placeholder(s) in the messages; they must match")
    found = _count(messages, AUDIO_PLACEHOLDER)
    if attr.audios and found != len(audios):
        raise RecordProblem(f"field {attr.audios!r}: {len(audios)} audio file(s) but {found} {AUDIO_PLACEHOLDER} "
                            "placeholder(s) in the messages; they must match")
    from lmf.data.media.audios import audio_problem
    from lmf.data.media.videos import video_problem

    out["_images"] = _resolve_media(images, attr.images or "images", image_problem, media_dir)
    out["_videos"] = _resolve_media(videos, attr.videos, video_problem, media_dir) if videos else []
    out["_audios"] = _resolve_media(audios, attr.audios, audio_problem, media_dir) if audios else []
    return out


def convert_record(record: Any, attr: DatasetAttr, stage: str,
                   media_dir: Optional[str] = None) -> tuple[Optional[dict], Optional[str]]:
    """(normalized record, None) or (None, problem naming the field). ``media_dir``: where relative image paths
    are looked up."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    part_images: list[str] = []
    try:
        if attr.formatting == "alpaca":
            out = _alpaca(record, attr, stage)
        elif attr.formatting == "pair":
            out = _pair(record, attr, stage, part_images)
        else:
            out = _sharegpt(record, attr, stage, part_images)
        return _attach_media(out, record, attr, stage, media_dir, part_images), None
    except RecordProblem as exc:
        return None, str(exc)
