"""Chat templates: moekit's default, a Hugging Face style template written here (rendered as transformers renders
it, checked against transformers itself where it is installed), and the errors for bad messages."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("jinja2", reason="chat templates need jinja2 (pip install 'moekit[serve]')")
pytest.importorskip("pydantic", reason="the server's request models need pydantic (pip install 'moekit[serve]')")

from moekit.serve.chat import DEFAULT_STOP, ChatTemplate, check_messages, load_chat_template  # noqa: E402
from moekit.serve.protocol import RequestError  # noqa: E402

# Mistral-style: BOS once, alternation enforced with raise_exception, the system prompt folded into the first turn,
# EOS after every assistant turn; whitespace control as hub templates write it
HF_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] + '\\n\\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
    {%- else %}
        {{- message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ ' ' }}{% endif %}
"""

CONFIG = {"chat_template": HF_TEMPLATE, "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


def test_default_template_renders_role_markers_and_opens_the_reply():
    t = ChatTemplate()
    assert t.origin == "default" and t.stop == DEFAULT_STOP
    text = t.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert load_chat_template({}).render([{"role": "user", "content": "x"}]) == "<|user|>\nx\n<|assistant|>\n"


def test_hf_template_from_tokenizer_config():
    t = load_chat_template(CONFIG)
    assert t.origin == "tokenizer_config.json" and t.stop == ()
    assert t.render(CONVERSATION) == "<s>[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] Bye [/INST] "


def test_hf_template_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the cross-check renders with transformers too")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "chat_template": HF_TEMPLATE}))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    want = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert load_chat_template(CONFIG).render(CONVERSATION) == want


def test_template_file_beside_the_config_wins_and_named_templates(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content | upper }}{% endfor %}")
    t = load_chat_template(CONFIG, tmp_path)
    assert t.origin.endswith("chat_template.jinja") and t.render([{"role": "user", "content": "hi"}]) == "HI"
    named = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    assert load_chat_template(named).render([{"role": "user", "content": "x"}]) == "D"
    with pytest.raises(ValueError, match="no 'default' template"):
        load_chat_template({"chat_template": [{"name": "tool_use", "template": "T"}]})
    with pytest.raises(ValueError, match="tokenizer_config.json: the chat template is not valid jinja"):
        load_chat_template({"chat_template": "{% for m in messages %}"})


def test_template_helpers_as_transformers_provides_them():
    src = ("{% for m in messages %}{% if loop.index0 > 0 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
           "{% generation %}!{% endgeneration %}{{ strftime_now('%Y') | length }}")
    out = load_chat_template({"chat_template": src}).render([{"role": "user", "content": "é"}, {"role": "user",
                                                                                              "content": "x"}])
    assert out == '{"role": "user", "content": "é"}!4'


def test_sandbox_refuses_unsafe_templates():
    t = load_chat_template({"chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(Exception, match="unsafe|access"):
        t.render([{"role": "user", "content": "x"}])


def test_text_parts_and_developer_role():
    msgs = check_messages([{"role": "developer", "content": "rules"},
                           {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert msgs == [{"role": "system", "content": "rules"}, {"role": "user", "content": "a\nb"}]


BAD_MESSAGES = [
    ([], "messages", "non-empty list"),
    ("hi", "messages", "non-empty list of messages, got 'hi'"),
    (["hi"], "messages[0]", "must be an object with role and content, got 'hi'"),
    ([{"content": "x"}], "messages[0].role", "must be one of system, developer, user, assistant, got None"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "x"}], "messages[1].role", "got 'tool'"),
    ([{"role": "user"}], "messages[0].content", "a string or a list of text parts, got None"),
    ([{"role": "user", "content": 5}], "messages[0].content", "got 5"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]",
     "only {'type': 'text', 'text': ...} parts are supported, got 'image_url'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text",
     "must be a string, got 3"),
]


@pytest.mark.parametrize("messages, param, what", BAD_MESSAGES, ids=[b[1] + str(i) for i, b in enumerate(BAD_MESSAGES)])
def test_bad_messages_are_400s_naming_the_message(messages, param, what):
    with pytest.raises(RequestError) as e:
        ChatTemplate().render(messages)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.message.startswith(f"{param}: ") and what in e.value.message


def test_template_raise_exception_is_a_400():
    with pytest.raises(RequestError) as e:
        load_chat_template(CONFIG).render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert e.value.status == 400 and e.value.param == "messages"
    assert "chat template refused them: Conversation roles must alternate" in e.value.message
