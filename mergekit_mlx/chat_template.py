"""Chat templates: the recipe's `chat_template` (`auto`, a built-in name, or a literal Jinja template)
resolved, read from an input's tokenizer files, checked before anything is merged (UTF-8, valid
Jinja), and written into the output's tokenizer as `chat_template.jinja`."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ModelError, RecipeError
from .formats.files import read_model_file

LOG = logging.getLogger(__name__)


# ---- built-in chat templates -----------------------------------------------------------------

# The names mergekit 0.1.5 ships. These render each format exactly (checked through transformers):
# chatml and mistral as mergekit's do; llama3 without the newline mergekit's leaves between turns,
# alpaca without its leading blank lines, exaone without the indentation its template leaks.
CHAT_TEMPLATES = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{%- for message in messages %}"
        "{%- if loop.first %}{{- bos_token }}{%- endif %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "alpaca": (
        "{%- set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{%- if system %}{{- system[-1]['content'] | trim + '\\n\\n' }}{%- endif %}"
        "{%- set headers = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} %}"
        "{%- for message in messages if message['role'] in headers %}"
        "{%- if not loop.first %}{{- '\\n\\n' }}{%- endif %}"
        "{{- headers[message['role']] + '\\n' + message['content'] | trim }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '\\n\\n### Response:\\n' }}{%- endif %}"
    ),
    "mistral": (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
        "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}"
        "{{- bos_token }}"
        "{%- for message in turns %}"
        "{%- if (message['role'] == 'user') != loop.index0 is even %}"
        "{{- raise_exception('after an optional system message, roles must alternate user, assistant, user, ...') }}"
        "{%- endif %}"
        "{%- if message['role'] == 'user' %}"
        "{%- if loop.first and system is not none %}{{- ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
        "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
        "{%- endfor %}"
    ),
    "exaone": (
        "{%- for message in messages %}"
        "{%- if loop.first and message['role'] != 'system' %}{{- '[|system|][|endofturn|]\\n' }}{%- endif %}"
        "{{- '[|' + message['role'] + '|]' + message['content'] }}"
        "{%- if message['role'] == 'user' %}{{- '\\n' }}{%- else %}{{- '[|endofturn|]\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '[|assistant|]' }}{%- endif %}"
    ),
}


def resolve_chat_template(chat_template: str | None, sources: Sequence[Any] = ()) -> str | None:
    """The template text a recipe's `chat_template` asks for (None: leave the tokenizer's own).

    "auto" takes the template most of the input models share (the first seen on a tie); a short
    name without braces must be a built-in; anything else must be a Jinja template.
    """
    if not chat_template:
        return None
    if chat_template == "auto":
        found = [t for t in (read_chat_template(s.tokenizer_dir) for s in sources if s.tokenizer_dir) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template]
    if len(chat_template) < 20 or "{" not in chat_template:
        raise RecipeError(
            f"chat_template: {chat_template!r} is neither a built-in template ({', '.join(CHAT_TEMPLATES)}), "
            "'auto', nor a Jinja template"
        )
    import jinja2

    try:
        jinja2.Environment().parse(chat_template)
    except jinja2.TemplateSyntaxError as e:
        raise RecipeError(f"chat_template: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    return chat_template


def read_chat_template(tokenizer_dir: Path | None) -> str | None:
    """A tokenizer directory's default chat template (stripped), from whichever file holds it.

    The directory is an input's: each file is read through `models.read_model_file` (a regular
    file inside it), and a template that is not UTF-8 text, or a file that is not JSON, is a
    ModelError naming the file.
    """
    if tokenizer_dir is None:
        return None
    d = Path(tokenizer_dir)
    template: Any = None
    if os.path.lexists(d / "chat_template.jinja"):
        raw = read_model_file(d, "chat_template.jinja", "chat template")
        try:
            template = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelError(f"{d / 'chat_template.jinja'}: the chat template is not UTF-8 text ({e})") from None
    else:
        for fname in ("chat_template.json", "tokenizer_config.json"):
            if not os.path.lexists(d / fname):
                continue
            raw = read_model_file(d, fname, "tokenizer file")
            try:
                data = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise ModelError(f"{d / fname}: not UTF-8 JSON, so its chat template cannot be read ({e})") from None
            if isinstance(data, dict) and data.get("chat_template"):
                template = data["chat_template"]
                break
    if isinstance(template, list):  # named templates: mergekit takes "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def check_chat_templates(chat_template: str | None, sources: Sequence[Any], tokenizer_model: int | None) -> None:
    """At plan time, read every chat template the output will take, so a bad one stops the run
    before anything is written: the recipe's (with `auto`, every input's) and, when the tokenizer is
    copied from one model, that model's own."""
    resolve_chat_template(chat_template, sources)
    if tokenizer_model is not None:
        read_chat_template(sources[tokenizer_model].tokenizer_dir)


def apply_chat_template(out_dir: Path, chat_template: str | None, sources: Sequence[Any] = ()) -> None:
    """Set the chat template of the tokenizer written in out_dir (as chat_template.jinja)."""
    template = resolve_chat_template(chat_template, sources)
    if template is None:
        return
    out_dir = Path(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    if not config_path.is_file() and not (out_dir / "tokenizer.json").is_file():
        LOG.warning("chat_template is set but %s holds no tokenizer; the template is not saved", out_dir)
        return
    # one place for the template: transformers reads chat_template.jinja before the others
    (out_dir / "chat_template.jinja").write_text(template)
    data = _read_output_json(config_path)
    if isinstance(data, dict) and "chat_template" in data:
        del data["chat_template"]
        config_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "chat_template.json").unlink(missing_ok=True)


def _read_output_json(path: Path) -> Any:
    """A JSON file this tool has just written (never an input's)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
