"""Trying the adapters: every arm of a run folder answers as that arm's model stood when training ended, the base as
the pure base model does, switching leaves nothing behind, and the answers a run publishes are the ones `crma
generate` gives; hostile requests get one line and stay inside their caps."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from crma.ablation.cli import run_cli
from crma.ablation.engine.arm_set import ArmSet
from crma.ablation.engine.generation import GenerationConfig
from crma.ablation.models import load_model
from crma.ablation.output.adapters import BASE, AdapterBank
from crma.ablation.output.run_folder import run_to_folder
from crma.ablation.spec.schema import parse_config
from crma.lab import tryout

ARMS = ["lora", "lora-matched", "lora+crma"]  # three adapters that train to different weights
ROW = {"instruction": "Name a colour of the sky."}
GREEDY = GenerationConfig(max_new_tokens=10)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of three arms on the tiny model, recording each trained arm's greedy answer at the end of training, in
    the process that trained it (before its adapters were saved)."""
    out = tmp_path_factory.mktemp("run") / "run"
    trained: dict[str, list[int]] = {}
    logits: dict[str, torch.Tensor] = {}
    original = ArmSet.save_adapters

    def record(self, root):
        self.model.eval()
        ids = None
        with torch.no_grad():
            for arm in self.arms:
                self.activate(arm)
                if ids is None:
                    bank_like = AdapterBank.__new__(AdapterBank)
                    bank_like.tokenizer = self.loaded.tokenizer
                    ids = torch.tensor([bank_like.prompt_ids(ROW)])
                out_ids = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                    pad_token_id=self.loaded.tokenizer.pad_token_id,
                )  # fmt: skip
                trained[arm.label] = out_ids[0, ids.shape[1] :].tolist()
                logits[arm.label] = self.model(ids).logits[0, -1].clone()
        return original(self, root)

    ArmSet.save_adapters = record
    try:
        # Kaiming LoRA (no PiSSA): the saved adapter is the trained one bit for bit, so the answers can be equal
        # token for token (a PiSSA adapter is converted to a plain LoRA on the original base when saved).
        cfg = parse_config(
            dict(model="tiny-random", rows=12, steps=4, batch_size=2, seq_len=160, arms=ARMS, lora_init="default",
                 eval_rows=3, answer_rows=2, answer_tokens=6, lr=5e-3)
        )  # fmt: skip
        result = run_to_folder(cfg, out, charts=False)
    finally:
        ArmSet.save_adapters = original
    assert result.status == "finished", result.error
    trained["logits"] = logits
    return out, trained, result


def test_each_column_is_its_own_arm_and_the_base_is_the_pure_base(finished_run) -> None:
    out, trained, _ = finished_run
    pure = load_model("tiny-random")  # never touched by peft or CRMA
    with AdapterBank.from_run(out) as bank:
        ids = bank.prompt_ids(ROW)
        columns = {arm: bank.answer(arm, ids, GREEDY).token_ids for arm in [BASE, *bank.labels]}
    reference = pure.model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=10,
        do_sample=False, pad_token_id=pure.tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()  # fmt: skip
    assert columns[BASE] == reference
    for arm in ARMS:
        assert columns[arm] == trained[arm], arm  # the arm's model as it stood when training ended
    # Each column comes from its own adapter: the next-token distribution under each arm is that arm's trained one,
    # and no two arms (nor an arm and the base) share it, so a column made by the wrong adapter fails here.
    with AdapterBank.from_run(out) as bank, torch.no_grad():
        prompt = torch.tensor([bank.prompt_ids(ROW)])
        seen = {}
        for arm in [BASE, *ARMS]:
            with bank.use(arm) as model:
                seen[arm] = model(prompt).logits[0, -1]
    for arm in ARMS:
        assert torch.equal(seen[arm], trained["logits"][arm]), arm
    assert torch.equal(seen[BASE], pure.model(prompt).logits[0, -1])
    names = [BASE, *ARMS]
    assert all(not torch.equal(seen[a], seen[b]) for i, a in enumerate(names) for b in names[i + 1 :])


def test_switching_arms_leaves_no_state_behind(finished_run) -> None:
    out, _, _ = finished_run
    with AdapterBank.from_run(out) as bank:
        ids = bank.prompt_ids(ROW)
        alone = bank.answer("lora+crma", ids, GREEDY).token_ids
    with AdapterBank.from_run(out) as bank:
        first = bank.answer("lora+crma", ids, GREEDY).token_ids
        bank.answer("lora", ids, GREEDY)
        bank.answer(BASE, ids, GREEDY)
        again = bank.answer("lora+crma", ids, GREEDY).token_ids
        loaded = bank.loaded
    assert first == alone == again
    # Closing the bank gives the base model back as it was: no LoRA layer, no CRMA hook.
    assert not any("lora_" in name for name, _ in loaded.model.named_parameters())
    assert not hasattr(loaded.model.model, "crma")


def test_sampling_shares_one_seed_and_leaves_the_callers_random_stream_alone(finished_run) -> None:
    out, _, _ = finished_run
    sampled = GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    with AdapterBank.from_run(out) as bank:
        ids = bank.prompt_ids(ROW)
        torch.manual_seed(123)
        before = torch.get_rng_state()
        a = bank.answer(BASE, ids, sampled).token_ids
        b = bank.answer(BASE, ids, sampled).token_ids
        assert torch.equal(torch.get_rng_state(), before)
    assert a == b  # the same seed before every answer: the same draw


def test_the_runs_answers_are_what_crma_generate_gives(finished_run, capsys) -> None:
    out, _, result = finished_run
    answers = json.loads((out / "summary.json").read_text())["answers"]
    assert [p["row"] for p in answers["prompts"]] == [12, 13]  # the first rows of the test slice
    assert set(answers["by_arm"]) == {BASE, *ARMS}
    first = answers["prompts"][0]
    assert run_cli(["generate", str(out), "--prompt", first["instruction"], "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    blocks = {part.split(" (", 1)[0].strip(): part for part in printed.split("== ")[1:]}
    assert set(blocks) == {BASE, *ARMS}
    with AdapterBank.from_run(out) as bank:
        ids = bank.prompt_ids(first)
        for arm in [BASE, *ARMS]:
            text = bank.answer(arm, ids, GenerationConfig(max_new_tokens=6)).text
            assert answers["by_arm"][arm][0]["text"] == text  # summary.json holds what a later generate gives
            assert (text.strip() or "(nothing)") in blocks[arm]
    summary_md, report = (out / "summary.md").read_text(), (out / "report.html").read_text()
    assert "### What the arms answer" in summary_md and "<h3>What the arms answer</h3>" in report
    assert f"**Row {first['row']}:**" in summary_md and first["reference"].split()[0] in summary_md


def test_the_model_card_of_each_pushed_adapter_shows_its_own_answers(finished_run) -> None:
    from crma.ablation.output.publish import adapter_card, model_card

    out, _, _ = finished_run
    answers = json.loads((out / "summary.json").read_text())["answers"]
    card = adapter_card(out, "lora+crma", repo_id="me/run", base_model="tiny-random")
    assert card.startswith("# lora+crma") and "crma.load" in card
    assert "| base |" in card and "| lora+crma |" in card and "| lora |" not in card
    mine = answers["by_arm"]["lora+crma"][0]["text"]
    assert (" ".join(mine.split()) or "(nothing)")[:20] in card
    assert "What the arms answer" in model_card(out, repo_id="me/run", base_model="tiny-random", dataset="bundled")


def test_hostile_requests_get_one_line_and_stay_in_their_caps(finished_run, monkeypatch) -> None:
    out, _, _ = finished_run
    with pytest.raises(ValueError, match="the prompt is empty"):
        tryout.check_prompt("   ")
    with pytest.raises(ValueError, match="at most 2000 on this Space"):
        tryout.check_prompt("x" * 2001)
    with pytest.raises(ValueError, match="at most 256 new tokens"):
        tryout.decoding(10_000, 0, 1, 0)
    with pytest.raises(ValueError, match="not valid"):
        tryout.decoding("many", 0, 1, 0)
    with AdapterBank.from_run(out) as bank:
        with pytest.raises(ValueError, match="at most 3 are allowed"):
            list(bank.stream(BASE, bank.prompt_ids(ROW), GenerationConfig(max_prompt_tokens=3)))
        with pytest.raises(ValueError, match="the prompt is empty"):
            list(bank.stream(BASE, [], GREEDY))
        with pytest.raises(ValueError, match="no arm 'dora'"):
            bank.answer("dora", [1, 2], GREEDY)
        # A stop ends an answer at its next token; so does the wall cap.
        stop = threading.Event()
        stop.set()
        *_, (_, stopped) = bank.stream("lora", bank.prompt_ids(ROW), GenerationConfig(max_new_tokens=50), stop=stop)
        assert stopped.ended == "stopped" and stopped.tokens <= 1
        timed = bank.answer("lora", bank.prompt_ids(ROW), GenerationConfig(max_new_tokens=50, max_seconds=1e-9))
        assert timed.ended == "time" and timed.tokens <= 1
    # The whole request is capped too: past TRY_CAPS["seconds"] every arm left is marked stopped, not run.
    monkeypatch.setitem(tryout.TRY_CAPS, "seconds", 0.0)
    events = list(tryout.stream_answers(str(out), "Say hi.", "", GREEDY.to_json()))
    assert {e["arm"] for e in events} == {BASE, *ARMS} and all(e["ended"] == "stopped" for e in events)
    with pytest.raises(ValueError, match="no finished run"):
        list(tryout.stream_answers(str(out.parent / "missing"), "Say hi.", "", GREEDY.to_json()))


def test_a_run_pushed_to_the_hub_and_downloaded_answers_the_same(finished_run, tmp_path, monkeypatch) -> None:
    """`crma generate` works on a run made anywhere: the files a push uploads, written into a fresh folder as a
    download would, answer exactly as the run folder they came from."""
    import huggingface_hub.constants as hf_constants
    from hub_standin import HubStandIn, TokenInfo

    from crma.ablation.output.publish import push_results

    out, _, _ = finished_run
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    hub = HubStandIn({"hf_visitor": TokenInfo("alice")}).start()
    try:
        push_results(out, "alice/run", token="hf_visitor", endpoint=hub.url)
        files = dict(hub.repos["alice/run"].files)
    finally:
        hub.stop()
    downloaded = tmp_path / "downloaded"
    for rel, data in files.items():
        (downloaded / rel).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / rel).write_bytes(data)
    with AdapterBank.from_run(out) as here, AdapterBank.from_run(downloaded) as there:
        assert there.labels == here.labels == ARMS
        ids = here.prompt_ids(ROW)
        assert there.prompt_ids(ROW) == ids
        for arm in [BASE, *ARMS]:
            assert there.answer(arm, ids, GREEDY).token_ids == here.answer(arm, ids, GREEDY).token_ids, arm
