"""Record formats users have (ShareGPT, TRL prompt-completion, raw text, data.fields), chat templates
(built-in, jinja file, base tokenizer without one), train_on_inputs, and tool calls, with the real
SmolLM2 tokenizer."""

import copy
import json

import pytest

from qzo.config.schema import DEFAULTS, load_config
from qzo.data.dataset import IGNORE, ChatDataset, datasets_from_config, encode_chat, to_chat
from qzo.data.formats import Example, to_example
from qzo.errors import ConfigError, DataError
from qzo.data.templates import BUILTIN, set_chat_template

END = "<|im_end|>\n"
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": CITY}}]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "name": "get_weather", "content": "{\"temp_c\": 21}"},
    {"role": "assistant", "content": "21 C in Paris."},
]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _trained(tok, ids, labels):
    return tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])


def _masked(tok, ids, labels):
    return tok.decode([t for t, y in zip(ids, labels) if y == IGNORE])


@pytest.fixture
def tok(tiny_tokenizer):
    """The SmolLM2 tokenizer, its own chat template put back after the test (tests set others on it)."""
    own = tiny_tokenizer.chat_template
    yield tiny_tokenizer
    tiny_tokenizer.chat_template = own


def _cfg(**data):
    cfg = copy.deepcopy(DEFAULTS)
    cfg["data"].update(data)
    cfg["train"]["max_len"] = 256
    return cfg


def test_sharegpt_roles_are_mapped():
    record = {"system": "Be terse.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "user", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "get_weather", '
                                                                            '"arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": "21 C"}, {"from": "model", "value": "21 C."}]}
    chat = to_chat(record)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant", "tool", "assistant"]
    assert chat[0]["content"] == "Be terse." and chat[2]["content"] == "Hello"
    assert chat[4]["tool_calls"] == [WEATHER_CALL] and chat[4]["content"] == ""
    narrated = {"conversations": [{"from": "human", "value": "a"}, {"from": "narrator", "value": "b"}]}
    with pytest.raises(DataError, match=r"turn 1 has \"from\" 'narrator'.*data.fields.roles"):
        to_chat(narrated)
    assert to_chat(narrated, fields={"roles": {"narrator": "assistant"}})[1] == {"role": "assistant", "content": "b"}
    # a record-level system string is the system message of any chat format; data.system_prompt only fills in
    alpaca = {"system": "Be kind.", "instruction": "Hi", "output": "Hello"}
    assert to_chat(alpaca, system_prompt="S.")[0] == {"role": "system", "content": "Be kind."}
    assert to_chat({**alpaca, "system": None}, system_prompt="S.")[0] == {"role": "system", "content": "S."}
    with pytest.raises(DataError, match="no assistant turn"):
        to_chat({"conversations": [{"from": "human", "value": "a"}]})


def test_sharegpt_file_trains_on_the_gpt_turns(tmp_path, tok):
    path = _write(tmp_path / "sg.jsonl", [
        {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red"}]},
        {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "2+2?"},
                           {"from": "gpt", "value": "4"}]}])
    train, _ = datasets_from_config(_cfg(train=str(path), eval=str(path), format="sharegpt"), tok)
    assert [_trained(tok, x, y) for x, y in zip(train.input_ids, train.labels)] == ["red" + END, "4" + END]


def test_trl_conversational_prompt_completion_trains_on_the_completion_only(tok):
    record = {"prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                         {"role": "user", "content": "And 3+3?"}],
              "completion": [{"role": "assistant", "content": "6"}]}
    example = to_example(record)
    assert example.first_trained == 3 and [m["content"] for m in example.messages] == ["2+2?", "4", "And 3+3?", "6"]
    ds = ChatDataset.from_chats(tok, [example], max_len=256)
    assert _trained(tok, ds.input_ids[0], ds.labels[0]) == "6" + END  # the prompt's assistant turn is not trained
    assert "4" + END in _masked(tok, ds.input_ids[0], ds.labels[0])
    with_system = to_example(record, system_prompt="S.")
    assert with_system.messages[0]["role"] == "system" and with_system.first_trained == 4
    with pytest.raises(DataError, match="both be strings or both message lists"):
        to_example({"prompt": "2+2?", "completion": [{"role": "assistant", "content": "4"}]})
    with pytest.raises(DataError, match="no assistant turn in its completion"):
        to_example({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    "completion": [{"role": "user", "content": "c"}]})


def test_raw_text_trains_every_token_and_long_texts_become_pieces(tmp_path, tok):
    short, long = "Zeroth-order training.", " ".join(f"w{i}" for i in range(120))
    path = _write(tmp_path / "t.jsonl", [{"text": short}, {"text": long}])
    ds = ChatDataset.from_source(tok, path, max_len=64)
    ids = tok(long)["input_ids"] + [tok.eos_token_id]
    pieces = [ids[i : i + 64] for i in range(0, len(ids), 64)]
    assert len(pieces) >= 3 and len(pieces[-1]) >= 2
    assert ds.input_ids[0] == tok(short)["input_ids"] + [tok.eos_token_id] == ds.labels[0]  # every token trained
    assert ds.input_ids[1:] == pieces and ds.labels[1:] == ds.input_ids[1:]  # all of it, in max_len pieces
    assert ds.chats == [None] * len(ds)  # no chat to generate replies to
    with pytest.raises(DataError, match="raw text records; objective.kind=reward"):
        cfg = _cfg(train=str(path), eval=str(path))
        cfg["objective"].update(kind="reward", reward="token_f1")
        datasets_from_config(cfg, tok)
    with pytest.raises(ConfigError, match="data.format text.*objective.kind=reward"):
        load_config(None, ["data.format=text", "objective.kind=reward", "objective.reward=token_f1"])
    with pytest.raises(DataError, match=r't.jsonl:1: data.format "chat" expects'):
        ChatDataset.from_source(tok, path, max_len=64, format="chat")


def test_fields_map_other_layouts(tmp_path, tok):
    fields = {"messages": "conv", "role": "speaker", "content": "text", "roles": {"bot": "assistant", "person": "user"}}
    record = {"conv": [{"speaker": "person", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}], "id": 7}
    assert to_chat(record, fields=fields) == [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello"}]
    qa = {"question": "2+2?", "answer": "4"}
    assert to_chat(qa, fields={"prompt": "question", "completion": "answer"})[1] == \
        {"role": "assistant", "content": "4"}
    path = _write(tmp_path / "conv.jsonl", [record])
    cfg = load_config(None, [f"data.train={path}", f"data.eval={path}", "train.max_len=64",
                             "data.fields={messages: conv, role: speaker, content: text, "
                             "roles: {bot: assistant, person: user}}"])
    train, _ = datasets_from_config(cfg, tok)
    assert _trained(tok, train.input_ids[0], train.labels[0]) == "Hello" + END
    with pytest.raises(DataError, match=r"conv.jsonl:1: expected an object .*found fields: conv, id \(name yours "
                                        r"with data.fields\)"):
        ChatDataset.from_source(tok, path, max_len=64)
    with pytest.raises(DataError, match=r"message 0 needs a \"role\".*data.fields.roles\); got 'person'"):
        to_chat(record, fields={"messages": "conv", "role": "speaker", "content": "text"})


@pytest.mark.parametrize("value,match", [
    ("{}", "must be null or a mapping"),
    ("{msgs: conv}", r"unknown keys \['msgs'\]; the keys are messages, conversations"),
    ("{messages: ''}", "messages must name a field"),
    ("{roles: {bot: robot}}", "roles must map the dataset's role names to one of system, user, assistant, tool"),
    ("[conv]", "'data.fields' must be dict"),
])
def test_bad_fields_are_refused_by_key(value, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, [f"data.fields={value}"])
    assert "data.fields" in str(info.value)


def test_train_on_inputs_trains_every_token(tok):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, labels = encode_chat(tok, chat, 256, train_on_inputs=True)
    assert labels == ids and tok.decode(ids).startswith("<|im_start|>system")
    cfg = load_config(None, ["data.train_on_inputs=true", "train.max_len=96"])
    train, held = datasets_from_config(cfg, tok)
    assert all(x == y for x, y in zip(train.input_ids + held.input_ids, train.labels + held.labels))
    with pytest.raises(ConfigError, match="'data.train_on_inputs' must be bool"):
        load_config(None, ["data.train_on_inputs=yes please"])


CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]


def test_builtin_templates_render_their_style(tok):
    want = {
        "chatml": "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello<|im_end|>\n",
        "llama3": f"{tok.bos_token}<|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>",
        "qwen2.5": "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\nHello<|im_end|>\n",
    }
    trained = {"chatml": "Hello" + END, "llama3": "Hello<|eot_id|>", "qwen2.5": "Hello" + END}
    assert set(BUILTIN) == set(want)
    for name, text in want.items():
        set_chat_template(tok, name)
        assert tok.apply_chat_template(CHAT, tokenize=False) == text
        ids, labels = encode_chat(tok, CHAT, 256)
        assert _trained(tok, ids, labels) == trained[name]
    set_chat_template(tok, "qwen2.5")  # Qwen2.5's default system message where the chat has none
    assert tok.apply_chat_template(CHAT[1:], tokenize=False).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")


def test_a_base_tokenizer_without_template_trains_with_data_chat_template(tmp_path, tok):
    tok.chat_template = None
    with pytest.raises(DataError, match=r"no chat template \(a base model\?\): set data.chat_template"):
        datasets_from_config(_cfg(), tok)
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}### assistant: {% endif %}")
    for value, end in (("chatml", END), (str(template), "\n")):
        tok.chat_template = None
        train, _ = datasets_from_config(_cfg(chat_template=value), tok)
        assert _trained(tok, train.input_ids[0], train.labels[0]).endswith("#qzo" + end)
        assert tok.chat_template  # the run's tokenizer renders with it from now on
    with pytest.raises(ConfigError, match=r"'data.chat_template' is 'vicuna': neither a built-in template "
                                          r"\(chatml, llama3, qwen2.5\) nor an existing file"):
        load_config(None, ["data.chat_template=vicuna"])
    assert load_config(None, [f"data.chat_template={template}"])["data"]["chat_template"] == str(template)


def test_tool_calls_pass_through_a_template_that_renders_them(tok):
    set_chat_template(tok, "qwen2.5")
    ids, labels = encode_chat(tok, TOOL_CHAT, 2048, tools=TOOLS)  # over 512 tokens of the tiny vocabulary
    trained = _trained(tok, ids, labels)
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' + END
                       + "21 C in Paris." + END)
    masked = _masked(tok, ids, labels)
    assert "<tool_response>\n{\"temp_c\": 21}\n</tool_response>" in masked and '"name": "get_weather"' in masked
    set_chat_template(tok, "llama3")
    ids, labels = encode_chat(tok, TOOL_CHAT, 2048, tools=TOOLS)
    trained = _trained(tok, ids, labels)  # SmolLM2 has no <|eot_id|> token: a token may straddle its end
    assert trained.startswith('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>')
    assert trained.endswith("21 C in Paris.<|eot_id|>") and "ipython" not in trained
    assert 'ipython<|end_header_id|>\n\n{"temp_c": 21}<|eot_id|>' in _masked(tok, ids, labels)
    # OpenAI's JSON-string arguments are parsed into the object templates expect
    openai = {**WEATHER_CALL, "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert to_chat({"messages": [TOOL_CHAT[0], {**TOOL_CHAT[1], "tool_calls": [openai]}]})[1]["tool_calls"] == \
        [WEATHER_CALL]


def test_tool_calls_a_template_drops_are_an_error_naming_the_line(tmp_path, tok):
    path = _write(tmp_path / "tools.jsonl", [{"messages": CHAT}, {"messages": TOOL_CHAT}])
    cfg = _cfg(train=str(path), eval=str(path))
    # SmolLM2's own template renders tool messages but silently drops tool_calls
    with pytest.raises(DataError, match=r"tools.jsonl:2: message 1 has tool_calls but the chat template ignores "
                                        r"them.*set data.chat_template to one that renders them \(built-in: "
                                        r"qwen2.5 or llama3"):
        datasets_from_config(cfg, tok)
    _write(path, [{"messages": TOOL_CHAT[:1] + TOOL_CHAT[3:], "tools": TOOLS}])
    with pytest.raises(DataError, match=r"tools.jsonl:1: the chat template ignores the record's \"tools\" list"):
        datasets_from_config(_cfg(train=str(path), eval=str(path), chat_template="chatml"), tok)
    strict = tmp_path / "strict.jinja"  # a template that refuses roles it does not know, as many do
    strict.write_text("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                      "{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}"
                      "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    _write(path, [{"messages": [TOOL_CHAT[0], {"role": "tool", "content": "21 C"}, TOOL_CHAT[3]]}])
    with pytest.raises(DataError, match=r"tools.jsonl:1: the chat template cannot render this chat \(roles "
                                        r"assistant, tool, user\): .*Only user and assistant.*set "
                                        r"data.chat_template"):
        datasets_from_config(_cfg(train=str(path), eval=str(path), chat_template=str(strict)), tok)
    with pytest.raises(DataError, match=r"message 0 has \"tool_calls\" but role 'user'"):
        to_chat({"messages": [{"role": "user", "content": "x", "tool_calls": [WEATHER_CALL]}, TOOL_CHAT[3]]})
    with pytest.raises(DataError, match="tool call without a function \"name\""):
        to_chat({"messages": [TOOL_CHAT[0], {"role": "assistant", "tool_calls": [{"function": {}}]}]})


def test_examples_keep_where_they_came_from(tmp_path):
    path = _write(tmp_path / "w.jsonl", [{"text": "a"}, {"messages": CHAT}])
    from qzo.data.dataset import read_examples

    examples = read_examples(path)
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:2"]
    assert isinstance(examples[0], Example) and examples[0].text == "a" and examples[1].messages == CHAT


def test_content_parts_and_json_tool_results_become_text():
    parts = [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]
    chat = to_chat({"messages": [{"role": "user", "content": parts}, TOOL_CHAT[1],
                                 {"role": "tool", "content": {"temp_c": 21}}, TOOL_CHAT[3]]})
    assert chat[0]["content"] == "Weather in Paris?" and chat[2]["content"] == '{"temp_c": 21}'
    with pytest.raises(DataError, match=r"message 0 \(user\) has content parts of types image, text; qzo trains "
                                        "text only"):
        to_chat({"messages": [{"role": "user", "content": [{"type": "image"}, *parts]}, TOOL_CHAT[3]]})
