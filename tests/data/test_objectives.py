"""Reward objectives: built-in rewards, load_reward, RewardLoss on a tiny model, qzo train with objective.kind=reward."""

import json
import math

import pytest
import torch

from qzo.config.schema import load_config
from qzo.errors import ConfigError, QzoError
from qzo.data.objectives import RewardLoss, check_rewards, exact_match, load_reward, split_chat, token_f1

from helpers import run_overrides


def test_exact_match_normalizes_case_and_whitespace():
    refs = ["Paris", "ANSWER: 12", "a  b", "x"]
    comps = ["  paris\n", "answer:   12", "A B", "x."]
    assert exact_match([""] * 4, comps, refs) == [1.0, 1.0, 1.0, 0.0]
    assert exact_match([], [], []) == []


def test_token_f1_hand_cases():
    f1 = lambda c, r: token_f1([""], [c], [r])[0]
    assert f1("the cat sat", "the cat sat") == 1.0
    assert f1("The  CAT", "the cat sat") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))  # P 1, R 2/3 -> 0.8
    assert f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)  # multiset overlap 2: P = R = 2/3
    assert f1("bird", "cat") == 0.0
    assert f1("", "") == 1.0 and f1("", "cat") == 0.0 and f1("cat", " ") == 0.0
    with pytest.raises(QzoError, match="2 completions but 1 references"):
        token_f1(["", ""], ["a", "b"], ["a"])


def _chars(prompts, completions, references):
    return [float(len(c)) for c in completions]


def _not_a_function():
    pass


not_callable = 3


def test_load_reward_names_modules_and_files(tmp_path, monkeypatch):
    assert load_reward("exact_match") is exact_match and load_reward(" token_f1 ") is token_f1
    assert load_reward(_chars) is _chars
    assert load_reward("test_objectives:_chars") is _chars  # the test file's folder is on sys.path under pytest
    (tmp_path / "my_rewards.py").write_text("def shout(p, c, r):\n    return [float(x.isupper()) for x in c]\n")
    fn = load_reward(f"{tmp_path / 'my_rewards.py'}:shout")
    assert fn([""], ["HI"], [""]) == [1.0]
    monkeypatch.chdir(tmp_path)  # a module in the working directory, as `qzo train` users keep them
    assert load_reward("my_rewards:shout")([""], ["hi"], [""]) == [0.0]


@pytest.mark.parametrize(
    "spec,match",
    [
        ("f1", "unknown reward 'f1'; choose exact_match or token_f1, or give 'module:function'"),
        ("no_such_module_qzo:fn", "no module named 'no_such_module_qzo'"),
        ("test_objectives:missing", "module 'test_objectives' has no attribute 'missing'"),
        ("test_objectives:not_callable", "test_objectives.not_callable is a int, not a function"),
        (":fn", "both parts non-empty"),
        ("/no/such/rewards.py:fn", "does not exist"),
        ("", "reward must be a function or a name"),
        (None, "reward must be a function or a name"),
    ],
)
def test_load_reward_errors(spec, match):
    with pytest.raises(QzoError, match=match):
        load_reward(spec)


def test_load_reward_reports_a_module_that_fails_to_import(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards_qzo.py").write_text("import not_installed_dependency_qzo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(QzoError, match="importing 'broken_rewards_qzo' failed: No module named 'not_installed"):
        load_reward("broken_rewards_qzo:fn")


def test_check_rewards_rejects_wrong_length_and_non_finite():
    assert check_rewards([1, 0.5], 2) == [1.0, 0.5]
    assert check_rewards(torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]
    with pytest.raises(QzoError, match=r"reward '_chars' returned 1 values for 2 completions"):
        check_rewards([1.0], 2, _chars)
    with pytest.raises(QzoError, match=r"non-finite values \(nan\) for completion\(s\) 1"):
        check_rewards([1.0, math.nan], 2, _chars)
    with pytest.raises(QzoError, match="must return a list of 2 numbers"):
        check_rewards(None, 2, _chars)


def test_split_chat_takes_the_last_assistant_turn():
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    prompt, ref = split_chat(chat)
    assert ref == "a2" and [m["content"] for m in prompt] == ["s", "q1", "a1", "q2"]
    with pytest.raises(QzoError, match="without an assistant turn"):
        split_chat([{"role": "user", "content": "q"}])


CHATS = [
    [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour, please, any colour."},
     {"role": "assistant", "content": "red"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import qzo

    model, tok = qzo.load(tiny_model_dir, quant="none")
    return model, tok


def test_reward_loss_is_minus_the_mean_reward(tiny):
    model, tok = tiny
    seen = {}

    def reward(prompts, completions, references):
        seen.update(prompts=prompts, references=references, completions=completions)
        return _chars(prompts, completions, references)

    loss = RewardLoss(model, tok, CHATS, reward, max_new_tokens=6, temperature=1.0)  # greedy: only newlines
    value = loss()
    assert isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.dim() == 0
    assert seen["prompts"] == ["What is 2 plus 2?", "Name a colour, please, any colour.", "Hi"]
    assert seen["references"] == ["4", "red", "Hello"]
    assert seen["completions"] == loss.last_completions and any(loss.last_completions)
    assert value.item() == pytest.approx(-sum(map(len, loss.last_completions)) / 3)
    assert loss.last_rewards == [float(len(c)) for c in loss.last_completions]
    assert torch.equal(loss(), value)  # the same step: the same draws
    greedy = RewardLoss(model, tok, CHATS, reward, max_new_tokens=6)
    assert greedy().item() == pytest.approx(-sum(map(len, greedy.last_completions)) / 3)


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(tiny):
    model, tok = tiny
    side = tok.padding_side
    together = RewardLoss(model, tok, CHATS, _chars, max_new_tokens=5)
    together()
    assert len(set(together._encode()["attention_mask"].sum(1).tolist())) == 3  # three prompt lengths
    for row, chat in enumerate(CHATS):
        one = RewardLoss(model, tok, [chat], _chars, max_new_tokens=5)
        one()
        assert one.last_completions[0] == together.last_completions[row]
        n = one.last_token_ids.shape[1]
        assert torch.equal(one.last_token_ids[0], together.last_token_ids[row, :n])
    assert tok.padding_side == side  # the tokenizer is left as it was


def test_sampling_uses_common_random_numbers_per_step(tiny):
    model, tok = tiny
    loss = RewardLoss(model, tok, CHATS, _chars, max_new_tokens=8, temperature=1.0, seed=3, step=1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = loss().item()
    first = loss.last_completions
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    b = loss().item()
    assert (a, first) == (b, loss.last_completions)  # the +eps and -eps evaluations of a step see the same draws
    loss.set_step(2)
    c = loss().item()
    assert loss.last_completions != first and c != a  # another step, other draws
    other_seed = RewardLoss(model, tok, CHATS, _chars, max_new_tokens=8, temperature=1.0, seed=4, step=1)
    other_seed()
    assert other_seed.last_completions != first
    greedy = RewardLoss(model, tok, CHATS, _chars, max_new_tokens=8)
    greedy()
    assert greedy.last_completions != first  # sampling at temperature 1 on a random model is not greedy


def test_reward_loss_errors(tiny):
    model, tok = tiny
    with pytest.raises(QzoError, match="returned 1 values for 3 completions"):
        RewardLoss(model, tok, CHATS, lambda p, c, r: [1.0], max_new_tokens=2)()
    with pytest.raises(QzoError, match="non-finite"):
        RewardLoss(model, tok, CHATS, lambda p, c, r: [math.inf] * len(c), max_new_tokens=2)()
    with pytest.raises(QzoError, match="max_new_tokens must be >= 1"):
        RewardLoss(model, tok, CHATS, _chars, max_new_tokens=0)
    with pytest.raises(QzoError, match="temperature must be >= 0"):
        RewardLoss(model, tok, CHATS, _chars, temperature=-1.0)
    with pytest.raises(QzoError, match="unknown reward"):
        RewardLoss(model, tok, CHATS, "bleu")


def test_zo_step_on_a_reward(tiny_model_dir):
    """opt.step takes a RewardLoss: two generations, and the step's losses are their -mean rewards."""
    import qzo

    model, tok = qzo.load(tiny_model_dir, quant="nf4")
    params = qzo.lora(model, r=2, target_modules=["q_proj", "v_proj"], seed=0)
    opt = qzo.ZO(params, rule=qzo.SGD(lr=1e-2), eps=1e-1, seed=0)
    rewards = []

    def reward(p, c, r):
        rewards.append(_chars(p, c, r))
        return rewards[-1]

    value = opt.step(RewardLoss(model, tok, CHATS, reward, max_new_tokens=4, temperature=1.0, step=1))
    assert opt.forwards == 2 and len(rewards) == 2
    assert opt.last_record.losses == pytest.approx([-sum(r) / 3 for r in rewards])
    assert value == pytest.approx(-(sum(rewards[0]) + sum(rewards[1])) / 6)


def _sets(model_dir, data, out_dir, **extra):
    return run_overrides(model_dir, data, out_dir, **{**{"optim.eps": 5e-2, "train.steps": 3, "train.batch_size": 3, "train.save_every": 3,
                 "objective.kind": "reward", "objective.max_new_tokens": 4, "objective.temperature": 1.0}, **extra})


def test_train_with_a_reward_objective_logs_minus_rewards(tiny_model_dir, tmp_path):
    from qzo.data.dataset import Batcher, ChatDataset
    from qzo.train.loop import train

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 2))
    log = tmp_path / "rewards.jsonl"
    (tmp_path / "count_rewards.py").write_text(
        "import json\n"
        "def reward(prompts, completions, references):\n"
        "    values = [float(len(c)) for c in completions]\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(json.dumps({'prompts': prompts, 'references': references, 'values': values}) + '\\n')\n"
        "    return values\n")
    out = tmp_path / "run"
    summary = train(None, _sets(tiny_model_dir, data, out, **{"objective.reward": f"{tmp_path}/count_rewards.py:reward"}),
                    progress=False)
    assert summary["steps"] == 3 and summary["final_eval_loss"] is not None  # held-out stays cross-entropy
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(calls) == 6 and [s["step"] for s in steps] == [1, 2, 3]
    losses = [loss for s in steps for loss in s["losses"]]
    assert losses == pytest.approx([-sum(c["values"]) / 3 for c in calls])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics[1:]] == pytest.approx([s["loss"] for s in steps])
    # each step generated for the raw chats of its own batch (the rows Batcher.indices names)
    import qzo

    _, tok = qzo.load(tiny_model_dir, quant="none")
    ds = ChatDataset.from_source(tok, str(data), 48)
    batcher = Batcher(ds, 3, seed=1, pad_id=tok.pad_token_id)
    for step in (1, 2, 3):
        want = [split_chat(ds.chats[i])[1] for i in batcher.indices(step)]
        assert calls[2 * step - 2]["references"] == calls[2 * step - 1]["references"] == want


def test_train_with_a_bad_reward_fails_before_loading_the_model(tmp_path):
    from qzo.train.loop import train

    with pytest.raises(QzoError, match="no module named 'nowhere_qzo'"):
        train(None, ["model.source=/no/such/model", "objective.kind=reward", "objective.reward=nowhere_qzo:fn",
                     f"out_dir={tmp_path / 'run'}"], progress=False)
    assert not (tmp_path / "run").exists()


def test_batches_cover_each_row_once_per_epoch_and_are_a_function_of_the_step():
    from qzo.data.dataset import Batcher, ChatDataset

    ds = ChatDataset([[i, i + 1] for i in range(12)], [[i, i + 1] for i in range(12)])
    b = Batcher(ds, 4, seed=1, pad_id=0)
    for epoch in range(3):  # 3 batches an epoch: every row exactly once, in an order of its own
        rows = [b.batch(epoch * 3 + k)["input_ids"][:, 0].tolist() for k in (1, 2, 3)]
        assert sorted(r for batch in rows for r in batch) == list(range(12))
        assert [r for batch in rows for r in batch] == [i for k in (1, 2, 3) for i in b.indices(epoch * 3 + k)]
    assert b.indices(1) != b.indices(4)  # epochs reshuffle
    again = Batcher(ds, 4, seed=1, pad_id=0)
    assert [again.indices(s) for s in (7, 2, 5)] == [b.indices(s) for s in (7, 2, 5)]  # any order, same batches
    assert Batcher(ds, 4, seed=2, pad_id=0).indices(1) != b.indices(1)
    assert torch.equal(b.batch(5)["labels"], b.batch(5)["input_ids"])  # rows keep their own labels


def test_chat_datasets_keep_their_chats_through_split(tiny_tokenizer):
    from qzo.data.dataset import ChatDataset

    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "x"}]
    chats = [CHATS[0], long, CHATS[1], CHATS[2]] * 3
    ds = ChatDataset.from_chats(tiny_tokenizer, chats, max_len=48)
    assert ds.dropped == 3 and len(ds.chats) == len(ds) == 9 and long not in ds.chats
    train, held = ds.split(0.25, seed=0)
    for part in (train, held):
        for ids, chat in zip(part.input_ids, part.chats):
            assert ChatDataset.from_chats(tiny_tokenizer, [chat], 48).input_ids == [ids]
    assert ds.pack(96).chats is None


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["objective.kind=rl"], r"'objective.kind'.*cross_entropy, reward"),
        (["objective.kind=reward"], "'objective.reward' is not set"),
        (["objective.kind=reward", "objective.reward=bleu"], r"'objective.reward' is 'bleu'"),
        (["objective.max_new_tokens=0"], r"'objective.max_new_tokens' must be >= 1"),
        (["objective.temperature=-0.5"], r"'objective.temperature' must be >= 0"),
        (["objective.temperature=hot"], r"'objective.temperature' must be float"),
        (["objective.reward=3"], r"'objective.reward' must be str"),
        (["objective.kind=reward", "objective.reward=token_f1", "data.packing=true"], "data.packing cannot"),
        (["objective.kind=reward", "objective.reward=token_f1", "optim.strategy=gv", "optim.batched=true"],
         "optim.batched"),
    ],
)
def test_objective_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_objective_config_defaults_and_valid_values():
    cfg = load_config(None)
    assert cfg["objective"] == {"kind": "cross_entropy", "reward": None, "max_new_tokens": 32, "temperature": 0.0}
    cfg = load_config(None, ["objective.kind=reward", "objective.reward=rewards.py:short", "objective.temperature=1"])
    assert cfg["objective"]["reward"] == "rewards.py:short" and cfg["objective"]["temperature"] == 1


def trl_accuracy(completions, solution, **kwargs):
    """A reward with TRL's signature, written as TRL's accuracy_reward is: conversational completions, the
    dataset's solution column, everything else in **kwargs."""
    contents = [completion[0]["content"] for completion in completions]
    return [float(c == s) + 0.01 * len(c) for c, s in zip(contents, solution)]


def test_trl_signature_is_recognised_and_adapted():
    from qzo.data.objectives import TRLReward, is_trl_reward

    def only_kwargs(completions, **kwargs):
        return [0.0] * len(completions)

    def qzo_with_kwargs(prompts, completions, references, **kwargs):
        return [0.0] * len(completions)

    assert is_trl_reward(trl_accuracy) and is_trl_reward(only_kwargs)
    assert not is_trl_reward(_chars) and not is_trl_reward(qzo_with_kwargs) and not is_trl_reward(exact_match)
    fn = load_reward("test_objectives:trl_accuracy")
    assert isinstance(fn, TRLReward) and fn.__name__ == "trl_accuracy" and not is_trl_reward(fn)
    assert isinstance(load_reward(only_kwargs), TRLReward) and load_reward(qzo_with_kwargs) is qzo_with_kwargs
    # called with qzo's signature, each prompt string becomes one user message
    assert fn(["q"], ["red"], ["red"]) == [1.03]
    with pytest.raises(QzoError, match=r"reward '_three' returned 3 values for 1 completions"):
        TRLReward(_three).score([[]], ["a"], ["b"])


def _three(completions, **kwargs):
    return [1.0, 2.0, 3.0]


def test_reward_loss_calls_a_trl_reward_as_trl_does(tiny, tiny_model_dir):
    model, tok = tiny
    seen = {}

    def reward(prompts, completions, **kwargs):  # TRL's signature, keeping what it was given
        seen.update(kwargs, prompts=prompts, completions=completions)
        return trl_accuracy(completions, kwargs["solution"])

    loss = RewardLoss(model, tok, CHATS, reward, max_new_tokens=5, temperature=1.0, seed=2, step=1)
    value = loss()
    assert seen["prompts"] == [c[:-1] for c in CHATS]  # the prompt messages, system turn included
    assert seen["completions"] == [[{"role": "assistant", "content": c}] for c in loss.last_completions]
    assert seen["solution"] == seen["references"] == ["4", "red", "Hello"]
    decoded = [tok.decode(ids, skip_special_tokens=True).strip() for ids in seen["completion_ids"]]
    assert decoded == loss.last_completions
    assert all(len(ids) <= 5 for ids in seen["completion_ids"])
    assert value.item() == pytest.approx(-sum(trl_accuracy(seen["completions"], seen["solution"])) / 3)
    # by name, as objective.reward gives it, in a ZO step on the (4-bit) tiny model
    import qzo

    model, tok = qzo.load(tiny_model_dir, quant="nf4")
    opt = qzo.ZO(qzo.lora(model, r=2, target_modules=["q_proj"], seed=0), rule=qzo.SGD(lr=1e-2), eps=1e-1, seed=0)
    opt.step(RewardLoss(model, tok, CHATS, "test_objectives:trl_accuracy", max_new_tokens=4, step=1))
    assert opt.forwards == 2 and all(v <= 0 for v in opt.last_record.losses)  # -(match + 0.01 x characters)
