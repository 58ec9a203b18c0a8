"""The chat template is rendered once, at export, into fixed text around a user turn (manifest ``chat_template``)."""

from __future__ import annotations

import pytest
from test_export_support import byte_tokenizer

from firstkit.export.pipeline import ExportError, render_chat_template

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tok(template: str | None):
    tok = byte_tokenizer()
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("message", ["Hi", "What is 2+2? Answer briefly.", "ünïcode ✓", "{{ not jinja }}"])
def test_rendered_template_equals_apply_chat_template(message):
    tok = _tok("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
               + CHATML)
    t = render_chat_template(tok)
    want = tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
    assert t["prefix"] + message + t["suffix"] == want
    assert t["prefix"].startswith("<|im_start|>system") and t["suffix"] == "<|im_end|>\n<|im_start|>assistant\n"


def test_no_template_is_null_and_content_dependent_templates_are_refused():
    assert render_chat_template(_tok(None)) is None
    assert render_chat_template(None) is None
    with pytest.raises(ExportError, match="renders differently"):
        render_chat_template(_tok("{{ messages[0]['content'] | length }}:" + CHATML))
    with pytest.raises(ExportError, match="verbatim once"):
        render_chat_template(_tok("{{ messages[0]['content'] | upper }}"))
