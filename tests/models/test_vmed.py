"""The VMED: its teacher-forced passes and its serving calls on a pool are one model; its state
stays the same size however long the conversation; its checkpoint keeps its tokenizer."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from models import CheckpointError, load, save
from models.tokenizer import BOS, EOS, PAD, train_tokenizer
from models.vmed import VMED, ReplyStart, VMEDConfig, gaussian_kl, mixture_kl_bound, sample_prior
from tests.conftest import relative_error
from tests.models.agreement import assert_forward_and_step_agree, fill_random

VOCAB = 23
SENTENCES = [
    "hello how are you ?", "i am fine thanks .", "do you like dogs ?", "yes i love dogs .",
    "what do you do for work ?", "i am a teacher , and you ?",
]  # fmt: skip


def random_vmed(
    generator: torch.Generator,
    memory_reads: bool = True,
    use_links: bool = False,
    encoder_reads: bool = True,
    usage_decay: float = 1.0,
) -> VMED:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    config = VMEDConfig(
        vocab_size=VOCAB,
        embedding_size=6,
        controller_size=12,
        controller_layers=2,
        memory_rows=10,  # not a power of two
        word_size=6,
        read_heads=2,
        mixture_components=3,
        latent_size=5,
        mlp_size=7,
        use_links=use_links,
        memory_reads=memory_reads,
        encoder_reads=encoder_reads,
        usage_decay=usage_decay,
    )
    model = VMED(config)
    with torch.no_grad():  # sharp addressing, a non-trivial initial state
        model.encoder_interface.weight.mul_(4)
        model.read_interface.weight.mul_(4)
        for parameter in (model.initial_reads, model.initial_h, model.initial_c):
            parameter.normal_(generator=generator)
        model.initial_memory.normal_(generator=generator)
    return model.eval()


def random_tokens(
    lengths: list[int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token rows `[B, max]` (ids >= 4, <pad> after each length) and their mask."""
    longest = max(1, *lengths)
    tokens = torch.randint(4, VOCAB, (len(lengths), longest), generator=generator)
    mask = torch.arange(longest).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return tokens.masked_fill(~mask, PAD), mask


@pytest.mark.parametrize("memory_reads", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_teacher_forced_reply_matches_the_pool_path(
    backend: str, memory_reads: bool, monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """Contexts of different lengths (one empty) encoded one token per call with padding
    rows, `begin_reply` with the same noise, then teacher-forced `decode`: the logits match
    `reply_logits` to 1e-5; padding rows give zeros; other slots stay bit-identical."""
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", backend)
    model = random_vmed(generator, memory_reads, use_links=backend == "torch")
    lengths = [7, 0, 12] if backend == "torch" else [4, 0, 6]  # the interpreter is slow
    context, mask = random_tokens(lengths, generator)
    reply_inputs = torch.randint(4, VOCAB, (3, 5), generator=generator)
    reply_inputs[:, 0] = BOS
    noise = torch.randn(3, model.config.latent_size, generator=generator)
    uniform = torch.rand(3, generator=generator)
    with torch.no_grad():
        expected = model.reply_logits(context, mask, reply_inputs, noise, uniform)

    pool = model.new_pool(6)
    fill_random(pool, generator)
    slots = torch.tensor([4, -1, 0, 2])
    live = slots >= 0
    model.reset(pool, slots[live].tolist())
    untouched = {name: pool[name][[1, 3, 5]].clone() for name in pool}

    def padded(rows: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        out = fill.clone()
        out[live] = rows
        return out

    session_lengths = torch.tensor(lengths)
    for t in range(context.shape[1]):
        active = padded(torch.where(t < session_lengths, slots[live], -1), slots)
        active[~live] = -1
        tokens = padded(context[:, t], torch.full((4,), 99))  # junk on padding rows
        model.encode(pool, active, tokens)
    junk_noise = torch.full((4, model.config.latent_size), float("nan"))
    model.begin_reply(
        pool, slots, padded(noise, junk_noise), padded(uniform, torch.full((4,), 7.0))
    )
    outputs = []
    for t in range(reply_inputs.shape[1]):
        logits = model.decode(pool, slots, padded(reply_inputs[:, t], torch.full((4,), -5)))
        assert torch.equal(logits[~live], torch.zeros_like(logits[~live]))
        outputs.append(logits[live])
    assert relative_error(torch.stack(outputs, dim=1), expected) < 1e-5
    for name in pool:
        assert torch.equal(pool[name][[1, 3, 5]], untouched[name]), name
    if not memory_reads:
        reads = pool["decoder_reads"][slots[live]]
        assert torch.equal(reads, torch.zeros_like(reads))


def test_language_model_view_step_matches_forward(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """`MemoryModel.step`/`forward` (previous-token rows in, next-token probabilities out)
    pass the check every served model passes."""
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    assert_forward_and_step_agree(random_vmed(generator), 20, generator)


def test_one_hot_step_is_decode(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    model = random_vmed(generator)
    pools = [model.new_pool(2), model.new_pool(2)]
    for pool in pools:
        model.reset(pool, [0, 1])
    tokens = torch.tensor([5, 9])
    probabilities = model.step(pools[0], torch.tensor([0, 1]), torch.eye(VOCAB)[tokens])
    logits = model.decode(pools[1], torch.tensor([0, 1]), tokens)
    assert torch.allclose(probabilities, torch.softmax(logits, dim=-1), atol=1e-7)
    for name in pools[0]:  # the same state after, `said` included
        assert torch.allclose(pools[0][name], pools[1][name], atol=1e-7), name


def test_said_records_every_token_decoded_in_the_conversation(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """Over three replies, `said` holds exactly the tokens given to `decode` (never <bos>),
    whatever the penalty; the penalty takes p off those tokens' logits and nothing else, and
    changes no state: a pool decoded with p = 2 and one with p = 0 end up equal."""
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    model = random_vmed(generator)
    pools = [model.new_pool(2), model.new_pool(2)]
    for pool in pools:
        model.reset(pool, [0, 1])
    slots = torch.tensor([0, 1])
    given: list[set[int]] = [set(), set()]
    for _ in range(3):
        noise = torch.randn(2, model.config.latent_size, generator=generator)
        uniform = torch.rand(2, generator=generator)
        for pool in pools:
            model.begin_reply(pool, slots, noise, uniform)
        previous = torch.tensor([BOS, BOS])
        for _ in range(5):
            plain = model.decode(pools[0], slots, previous)
            penalised = model.decode(pools[1], slots, previous, torch.tensor([2.0, 0.5]))
            for row, (ids, penalty) in enumerate(zip(given, (2.0, 0.5), strict=True)):
                if int(previous[row]) != BOS:
                    ids.add(int(previous[row]))
                expected = plain[row].clone()
                expected[sorted(ids)] -= penalty
                assert torch.allclose(penalised[row], expected, atol=1e-6)
            previous = torch.randint(4, VOCAB, (2,), generator=generator)
        for row in range(2):
            recorded = torch.nonzero(pools[0]["said"][row]).flatten().tolist()
            assert recorded == sorted(given[row])
    for name in pools[0]:
        assert torch.equal(pools[0][name], pools[1][name]), name


def test_a_presence_penalty_keeps_greedy_replies_from_repeating_a_token(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """With a penalty far above the logits' range, a greedy session never says a token twice
    in the conversation (until the vocabulary runs out), where without it it does."""
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    model = random_vmed(generator)

    def conversation(penalty: float) -> list[int]:
        pool = model.new_pool(1)
        model.reset(pool, [0])
        slot, said = torch.tensor([0]), []
        for turn in range(4):
            noise = torch.randn(
                1, model.config.latent_size, generator=torch.Generator().manual_seed(turn)
            )
            model.begin_reply(pool, slot, noise, torch.tensor([0.5]))
            previous = BOS
            for _ in range(4):  # and a fifth decode, from the fourth token, which ends the reply
                logits = model.decode(pool, slot, torch.tensor([previous]), torch.tensor([penalty]))
                logits[0, [BOS, EOS, PAD]] = -math.inf  # four tokens a reply, always
                previous = int(logits.argmax())
                said.append(previous)
            model.decode(pool, slot, torch.tensor([previous]), torch.tensor([penalty]))
        return said

    assert len(set(conversation(0.0))) < 16
    assert len(set(conversation(1e4))) == 16


def test_twenty_turns_leave_the_state_size_unchanged(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """A conversation of 20 turns, the user's and the model's own replies written to memory:
    the same tensors, the same bytes, finite values, and another session untouched."""
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")  # 300 steps: too many to interpret
    model = random_vmed(generator)
    pool = model.new_pool(2)
    model.reset(pool, [0, 1])
    shapes = {name: (pool[name].shape, pool[name].data_ptr()) for name in pool}
    other = pool.read(1)
    slot = torch.tensor([0])
    for _ in range(20):
        utterance = torch.randint(4, VOCAB, (6,), generator=generator).tolist()
        for token in [*utterance, EOS]:
            model.encode(pool, slot, torch.tensor([token]))
        noise = torch.randn(1, model.config.latent_size, generator=generator)
        model.begin_reply(pool, slot, noise, torch.rand(1, generator=generator))
        previous, reply = BOS, []
        for _ in range(8):
            previous = int(model.decode(pool, slot, torch.tensor([previous])).argmax())
            if previous == EOS:
                break
            reply.append(previous)
        for token in [*reply, EOS]:
            model.encode(pool, slot, torch.tensor([token]))
    assert {name: (pool[name].shape, pool[name].data_ptr()) for name in pool} == shapes
    assert pool.bytes_per_session == model.state_bytes
    assert all(bool(torch.isfinite(pool[name]).all()) for name in pool)
    for name, tensor in pool.read(1).items():
        assert torch.equal(tensor, other[name])


def test_the_state_holds_both_halves_and_z(generator: torch.Generator) -> None:
    specs = {spec.name: spec.shape for spec in random_vmed(generator).state_specs()}
    assert specs["memory"] == (10, 6) and specs["read_weights"] == (2, 10)
    assert specs["encoder_h"] == specs["decoder_h"] == (2, 12)
    assert specs["decoder_reads"] == (3, 6) and specs["z"] == (5,)
    assert specs["said"] == (VOCAB,)
    assert "link" not in specs
    with_links = {s.name for s in random_vmed(generator, use_links=True).state_specs()}
    assert {"link", "precedence"} <= with_links


def test_prior_sampling_follows_the_documented_convention() -> None:
    weights = torch.tensor([0.2, 0.5, 0.3])
    means = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    log_vars = torch.log(torch.tensor([[1.0, 1.0], [4.0, 4.0], [9.0, 9.0]]))
    uniform = torch.tensor([0.0, 0.1999, 0.2001, 0.6999, 0.7001, 0.999999])
    batch = len(uniform)
    start = ReplyStart(
        reads=torch.zeros(batch, 3, 1),
        log_weights=weights.log().expand(batch, -1),
        means=means.expand(batch, -1, -1),
        log_variances=log_vars.expand(batch, -1, -1),
    )
    noise = torch.tensor([[1.0, -1.0]]).expand(batch, -1)
    z = sample_prior(start, noise, uniform)
    components = [0, 0, 1, 1, 2, 2]
    for row, k in enumerate(components):
        sigma = math.sqrt([1.0, 4.0, 9.0][k])
        assert torch.allclose(z[row], torch.tensor([k + 1 + sigma, k + 1 - sigma]))


def test_kl_terms(generator: torch.Generator) -> None:
    """The Gaussian KL is torch.distributions'; the mixture bound of one component is it, and
    it is never below a Monte-Carlo estimate of the true KL to the mixture."""
    mean_q, log_var_q = (
        torch.randn(4, 3, generator=generator),
        torch.randn(4, 3, generator=generator),
    )
    mean_p, log_var_p = (
        torch.randn(4, 3, generator=generator),
        torch.randn(4, 3, generator=generator),
    )
    q = torch.distributions.Normal(mean_q, (0.5 * log_var_q).exp())
    p = torch.distributions.Normal(mean_p, (0.5 * log_var_p).exp())
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(gaussian_kl(mean_q, log_var_q, mean_p, log_var_p), expected, atol=1e-5)
    single = mixture_kl_bound(
        mean_q, log_var_q, torch.zeros(4, 1), mean_p.unsqueeze(1), log_var_p.unsqueeze(1)
    )
    assert torch.allclose(single, expected, atol=1e-5)

    means = torch.randn(1, 3, 2, generator=generator, dtype=torch.float64)
    log_vars = torch.randn(1, 3, 2, generator=generator, dtype=torch.float64) * 0.3
    log_weights = torch.log_softmax(torch.randn(1, 3, generator=generator, dtype=torch.float64), -1)
    mean, log_var = torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    samples = torch.randn(200_000, 1, 2, generator=generator, dtype=torch.float64)

    def log_density(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        squared = (x - mean).pow(2) / log_var.exp()
        return -0.5 * (squared + log_var + math.log(2 * math.pi)).sum(-1)

    log_q = log_density(samples[:, 0], mean, log_var)
    log_mixture = torch.logsumexp(log_weights + log_density(samples, means, log_vars), dim=-1)
    monte_carlo = float((log_q - log_mixture).mean())
    bound = float(mixture_kl_bound(mean, log_var, log_weights, means, log_vars))
    assert bound >= monte_carlo - 0.02


def test_bad_serving_calls_are_refused_and_change_nothing(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    model = random_vmed(generator)
    pool = model.new_pool(3)
    model.reset(pool, [0, 1, 2])
    before = {name: pool[name].clone() for name in pool}
    latent = model.config.latent_size
    calls: dict[str, Callable[[], object]] = {
        "float tokens": lambda: model.encode(pool, torch.tensor([0]), torch.tensor([1.0])),
        "token out of range": lambda: model.encode(pool, torch.tensor([0]), torch.tensor([VOCAB])),
        "negative token": lambda: model.decode(pool, torch.tensor([0]), torch.tensor([-1])),
        "repeated slot": lambda: model.encode(pool, torch.tensor([1, 1]), torch.tensor([4, 5])),
        "slot outside": lambda: model.encode(pool, torch.tensor([3]), torch.tensor([4])),
        "rows and slots": lambda: model.decode(pool, torch.tensor([0, 1]), torch.tensor([4])),
        "negative penalty": lambda: model.decode(
            pool, torch.tensor([0]), torch.tensor([4]), torch.tensor([-1.0])
        ),
        "NaN penalty": lambda: model.decode(
            pool, torch.tensor([0]), torch.tensor([4]), torch.tensor([math.nan])
        ),
        "penalty rows": lambda: model.decode(
            pool, torch.tensor([0]), torch.tensor([4]), torch.tensor([1.0, 1.0])
        ),
        "integer penalty": lambda: model.decode(
            pool, torch.tensor([0]), torch.tensor([4]), torch.tensor([1])
        ),
        "noise shape": lambda: model.begin_reply(
            pool, torch.tensor([0]), torch.zeros(1, latent + 1), torch.zeros(1)
        ),
        "NaN noise": lambda: model.begin_reply(
            pool, torch.tensor([0]), torch.full((1, latent), math.nan), torch.zeros(1)
        ),
        "uniform of 1": lambda: model.begin_reply(
            pool, torch.tensor([0]), torch.zeros(1, latent), torch.ones(1)
        ),
        "another model's pool": lambda: random_vmed(generator, use_links=True).encode(
            pool, torch.tensor([0]), torch.tensor([4])
        ),
    }
    for case, call in calls.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(case)
        for name in pool:
            assert torch.equal(pool[name], before[name]), (case, name)


def small_tokenizer() -> Tokenizer:
    return train_tokenizer(SENTENCES * 3, 40)


def test_checkpoint_round_trip_keeps_the_tokenizer(
    tmp_path: Path, generator: torch.Generator
) -> None:
    tokenizer = small_tokenizer()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    config = VMEDConfig(vocab_size=tokenizer.get_vocab_size(), controller_size=8, memory_rows=6,
                        word_size=4, latent_size=3, mlp_size=5, embedding_size=4)  # fmt: skip
    model = VMED(config, tokenizer)
    directory = save(model, tmp_path / "ckpt", {"task": "dialogue"})
    assert (directory / "tokenizer.json").read_bytes() == tokenizer.to_str().encode()
    loaded = load(directory)
    assert isinstance(loaded, VMED) and loaded.config == config
    assert loaded.tokenizer is not None and loaded.tokenizer.to_str() == tokenizer.to_str()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert (
        loaded.tokenizer.encode("do you like dogs ?").ids
        == tokenizer.encode("do you like dogs ?").ids
    )
    again = save(loaded, tmp_path / "again", {})
    assert (again / "tokenizer.json").read_bytes() == (directory / "tokenizer.json").read_bytes()

    (directory / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        load(directory)
    (directory / "tokenizer.json").write_bytes(train_tokenizer(SENTENCES, 30).to_str().encode())
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*tokens, the model"):
        load(directory)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer\.json"):
        load(directory)
    with pytest.raises(ValueError, match=r"needs its tokenizer\.json"):
        save(VMED(config), tmp_path / "none", {})


def test_without_memory_nothing_is_written_or_read(
    monkeypatch: pytest.MonkeyPatch, generator: torch.Generator
) -> None:
    """The no-memory ablation (neither the encoder nor the decoder reads): `encode` leaves
    the memory's state as it was, and the replies do not depend on what the memory holds."""
    monkeypatch.setenv("MEMSERVE_KERNEL_BACKEND", "torch")
    model = random_vmed(generator, memory_reads=False, encoder_reads=False)
    assert not model.config.uses_memory
    pool = model.new_pool(2)
    model.reset(pool, [0, 1])
    pool["memory"][1].normal_(generator=generator)  # the same session but for its memory
    before = {name: pool[name].clone() for name in ("memory", "usage", "read_weights")}
    slots = torch.tensor([0, 1])
    for token in torch.randint(4, VOCAB, (9,), generator=generator).tolist():
        model.encode(pool, slots, torch.tensor([token, token]))
    for name, tensor in before.items():
        assert torch.equal(pool[name], tensor), name
    noise = torch.randn(1, model.config.latent_size, generator=generator).expand(2, -1)
    model.begin_reply(pool, slots, noise, torch.full((2,), 0.5))
    logits = model.decode(pool, slots, torch.tensor([BOS, BOS]))
    assert torch.equal(logits[0], logits[1])


def test_the_bag_of_words_head_is_optional_and_saved(
    tmp_path: Path, generator: torch.Generator
) -> None:
    tokenizer = small_tokenizer()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    sizes = dict(vocab_size=tokenizer.get_vocab_size(), controller_size=8, memory_rows=6,
                 word_size=4, latent_size=3, mlp_size=5, embedding_size=4)  # fmt: skip
    plain = VMED(VMEDConfig(**sizes), tokenizer)  # type: ignore[arg-type]
    assert not any(name.startswith("bag_of_words") for name in plain.state_dict())
    state = {"encoder_h": torch.randn(2, 1, 8, generator=generator)}
    with pytest.raises(ValueError, match="no bag-of-words head"):
        plain.bag_of_words_logits(state, torch.zeros(2, 3))
    model = VMED(VMEDConfig(**sizes, bag_of_words=True), tokenizer)  # type: ignore[arg-type]
    z = torch.randn(2, 3, generator=generator)
    assert model.bag_of_words is not None
    expected = model.bag_of_words(torch.cat([state["encoder_h"][:, -1], z], dim=1))
    assert torch.equal(model.bag_of_words_logits(state, z), expected)
    loaded = load(save(model, tmp_path / "bow", {"task": "dialogue"}))
    assert isinstance(loaded, VMED) and loaded.config.bag_of_words
    assert torch.equal(loaded.bag_of_words_logits(state, z), expected)


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.01, math.nan])
def test_usage_decay_must_be_a_fraction(decay: float) -> None:
    with pytest.raises(ValueError, match="usage_decay must be in"):
        VMEDConfig(vocab_size=VOCAB, usage_decay=decay)
