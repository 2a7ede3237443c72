"""Fast MEAL V2: the discriminator and its loss, the gradients each side gets, the recipe's defaults, the student's
starting weights, exact resume with the discriminator, MEAL V2's checkpoint format, DDP with the discriminator."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from fkd_dali import meal
from fkd_dali.cli import main
from fkd_dali.generate import GenerateConfig, generate
from fkd_dali.models import create_model
from fkd_dali.soft_labels import recover, soft_cross_entropy
from fkd_dali.student_init import InitError
from fkd_dali.teachers import TeacherSpec
from fkd_dali.train import TrainError, Trainer, recipe_config, train
from tests.conftest import assert_same_weights, current_device, free_port, pythonpath
from tests.test_generate import make_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = current_device()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """30 training images, an ensemble store of two teachers (averaged on identical crops) and a student
    checkpoint to start from (a plain state_dict of a tiny_cnn over the 10 classes)."""
    w = make_world(str(tmp_path_factory.mktemp("meal")))
    root = w["root"]
    store = os.path.join(root, "store")
    generate(GenerateConfig(data=w["data"], save_path=store, teachers=[
        TeacherSpec("torchscript", path=w["teachers"][s], input_size=32) for s in (0, 1)], num_crops=8, top_k=5,
        group_size=8, batch_size=4, device=DEVICE, show_progress=False))
    torch.manual_seed(0)
    init = os.path.join(root, "start.pth")
    torch.save(create_model("tiny_cnn", 10).state_dict(), init)
    return {"root": root, "data": w["data"], "store": store, "init": init}


def meal_cfg(w, out, **kw):
    args = dict(data=w["data"], arch="tiny_cnn", softlabel_path=w["store"], num_crops=2, batch_size=16, epochs=4,
                input_size=32, device=DEVICE, output=str(out), show_progress=False, init_from=w["init"])
    args.update(kw)
    return recipe_config("meal-v2", **args)


# ---------------------------------------------------------------------------------------------- the discriminator
def test_discriminator_is_meal_v2s():
    d = meal.Discriminator(1000)
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in (d.conv1, d.conv2, d.conv3)] == \
        [(1000, 125, (1, 1)), (125, 15, (1, 1)), (15, 2, (1, 1))]
    out = d(torch.softmax(torch.randn(6, 1000), 1))
    assert out.shape == (6, 2) and (out >= 0).all()  # ReLU after the last layer too, as MEAL V2
    assert meal.Discriminator(10).conv1.out_channels == 8  # few classes: widths kept >= 8


def test_discriminator_loss_is_meal_v2s_formula():
    torch.manual_seed(1)
    d = meal.Discriminator(10)
    for p in d.parameters():  # a discriminator with non-trivial outputs
        torch.nn.init.normal_(p, 0.0, 0.5)
    s, a, b = (torch.softmax(torch.randn(4, 10) * 3, 1) for _ in range(3))

    def meal_v2(student, target):  # MEAL V2's loss.discriminatorLoss, written out
        x = torch.cat((student, target), 0)
        label = torch.FloatTensor([[1, 0]] * 4 + [[0, 1]] * 4)
        return torch.nn.BCEWithLogitsLoss()(d(x), label)

    assert meal_v2(s, a) > 0
    torch.testing.assert_close(meal.discriminator_loss(d, s, [a]), meal_v2(s, a))
    lam = 0.3  # CutMix: MEAL V2's d_loss(a) * lam + d_loss(b) * (1 - lam), in one forward pass
    torch.testing.assert_close(meal.discriminator_loss(d, s, [a, b], [lam, 1 - lam]),
                               meal_v2(s, a) * lam + meal_v2(s, b) * (1 - lam))


def test_each_side_gets_its_gradient_and_its_own_step(world, tmp_path):
    """One training step: the student moves by lr x the gradient of KL + discriminator loss (so it gets the
    discriminator's gradient through its softmax), the discriminator by d_lr x the gradient of its loss, each
    with its own optimizer."""
    trainer = Trainer(meal_cfg(world, tmp_path / "run", d_lr=0.003, amp=False))  # float32 as the reference
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}.isdisjoint(
        id(p) for p in trainer.objective.disc.parameters())
    loader = trainer.loader(2)
    loader.set_epoch(0)
    batch = {k: v.clone() for k, v in next(iter(loader)).items()}
    student, disc = copy.deepcopy(trainer.model), copy.deepcopy(trainer.objective.disc)
    lr = 0.01
    soft = recover(batch["topk_idx"], batch["topk_val"], 10, trainer.objective.label_type)
    out = student(batch["images"])
    kl = soft_cross_entropy(out, soft)
    d_loss = meal.discriminator_loss(disc, torch.softmax(out, 1), [soft])
    params, dparams = list(student.parameters()), list(disc.parameters())
    g_kl = torch.autograd.grad(kl, params, retain_graph=True)
    g_total = torch.autograd.grad(kl + d_loss, params + dparams)
    g_student, g_disc = g_total[:len(params)], g_total[len(params):]
    assert any(not torch.allclose(a, b) for a, b in zip(g_kl, g_student))  # the discriminator's gradient reaches it
    assert all(g.abs().sum() > 0 for g in g_disc)

    trainer.step(batch, lr)
    for p0, g, p1 in zip(params, g_student, trainer.model.parameters()):  # SGD's first step: p - lr * g (wd 0)
        torch.testing.assert_close(p1.detach(), p0.detach() - lr * g, atol=2e-6, rtol=1e-4)
    for p0, g, p1 in zip(dparams, g_disc, trainer.objective.disc.parameters()):
        torch.testing.assert_close(p1.detach(), p0.detach() - 0.003 * g, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(trainer.objective.d_loss.detach(), d_loss.detach())


# ---------------------------------------------------------------------------------------------- the recipe
def _parsed(argv, monkeypatch):
    seen = {}
    monkeypatch.setattr("fkd_dali.train.train", lambda c, scan=None: seen.setdefault("cfg", c.resolved()) and {})
    assert main(["train"] + argv.split()) == 0
    return seen["cfg"]


def test_recipe_defaults(monkeypatch):
    got = _parsed("--recipe meal-v2 --init-from S.pth --softlabel-path STORE DATA", monkeypatch)
    assert (got.recipe, got.num_crops, got.batch_size, got.epochs, got.lr, got.weight_decay, got.momentum, got.opt,
            got.cos, tuple(got.schedule), got.soft_label_type, got.use_discriminator_loss, got.d_lr, got.mixup_cutmix) \
        == ("meal-v2", 8, 512, 200, 0.01, 0.0, 0.9, "sgd", False, (100, 180), "marginal_smoothing_k5", True, 1e-4,
            False)
    # MEAL V2's README command, in its own spellings where they exist here
    readme = ("--recipe meal-v2 --save OUT --batch-size 512 -j 4 --model resnet50 --epochs 200 --num_crops 8 "
              "--soft_label_type marginal_smoothing_k5 --softlabel_path STORE --schedule 100 180 "
              "--use-discriminator-loss --student-state-file S.pth --w-cutmix --cos DATA")
    got = _parsed(readme, monkeypatch)
    assert (got.output, got.arch, got.init_from, got.cos, got.mixup_cutmix, got.mixup, got.cutmix,
            got.mixup_cutmix_prob) == ("OUT", "resnet50", "S.pth", True, True, 0.0, 1.0, 1.0)
    got = _parsed("--recipe meal-v2 --no-discriminator-loss --lr 0.02 --pretrained-weights DEFAULT DATA", monkeypatch)
    assert (got.use_discriminator_loss, got.lr, got.pretrained_weights) == (False, 0.02, "DEFAULT")
    got = _parsed("--softlabel-path STORE DATA", monkeypatch)  # FKD's defaults unchanged
    assert (got.recipe, got.num_crops, got.batch_size, got.epochs, got.lr, got.weight_decay, got.cos,
            tuple(got.schedule), got.use_discriminator_loss) == ("fkd", 4, 1024, 300, 0.1, 1e-4, False, (120, 240),
                                                                 False)


def test_recipe_refusals(world, tmp_path):
    with pytest.raises(TrainError, match="already trained: pass --init-from"):
        Trainer(meal_cfg(world, tmp_path, init_from=None))
    with pytest.raises(TrainError, match="with --labels fkd"):
        Trainer(meal_cfg(world, tmp_path, labels="hard", softlabel_path=None))
    with pytest.raises(TrainError, match="not both"):
        Trainer(meal_cfg(world, tmp_path, pretrained_weights="DEFAULT"))


# ---------------------------------------------------------------------------------------------- starting weights
def test_student_starts_from_the_checkpoint(world, tmp_path):
    trainer = Trainer(meal_cfg(world, tmp_path))
    start = torch.load(world["init"], weights_only=True)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v.cpu(), start[k]), k


def test_init_with_other_classes_is_refused(world, tmp_path):
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": create_model("resnet18", 1000).state_dict()},
               tmp_path / "imagenet.pth.tar")
    with pytest.raises(InitError, match=r"imagenet.pth.tar has 1000 classes \('fc.weight' has shape \(1000, 512\)\), "
                                        r"this run has 10 \(the classes of .*store\).*trained on these 10 classes"):
        Trainer(meal_cfg(world, tmp_path, arch="resnet18", init_from=str(tmp_path / "imagenet.pth.tar")))
    with pytest.raises(InitError, match="checkpoint of resnet18, not resnet34"):
        Trainer(meal_cfg(world, tmp_path, arch="resnet34", init_from=str(tmp_path / "imagenet.pth.tar")))


def test_pretrained_weights_come_from_the_local_hub_cache_only(world, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(InitError, match=f"not in the local torch hub cache \\({cached}\\).*--init-from FILE"):
        Trainer(meal_cfg(world, tmp_path, arch="resnet18", init_from=None, pretrained_weights="IMAGENET1K_V1"))
    cached.parent.mkdir(parents=True)
    torch.save(create_model("resnet18", 1000).state_dict(), cached)  # a file where torchvision keeps its weights
    with pytest.raises(InitError, match="resnet18 IMAGENET1K_V1 has 1000 classes.*this run has 10"):
        Trainer(meal_cfg(world, tmp_path, arch="resnet18", init_from=None, pretrained_weights="IMAGENET1K_V1"))


def test_pretrained_weights_load_from_the_cache_when_the_classes_match(tmp_path, monkeypatch):
    """The success path of --pretrained-weights: the file torchvision keeps in the hub cache for a weights name
    (here DEFAULT = IMAGENET1K_V1 of resnet18) is what the 1000-class student starts from, tensor for tensor."""
    from fkd_dali.student_init import init_from_torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.manual_seed(5)
    published = create_model("resnet18", 1000).state_dict()
    torch.save(published, cached)
    torch.manual_seed(6)
    student = create_model("resnet18", 1000)
    assert not torch.equal(student.fc.weight, published["fc.weight"])
    init_from_torchvision(student, "resnet18", "DEFAULT", 1000, "ImageNet's classes")
    got = student.state_dict()
    assert all(torch.equal(got[k], v) for k, v in published.items())


def test_meal_v2_checkpoint_format_evaluates_and_starts_a_student(world, tmp_path):
    """MEAL V2 saves ``model.state_dict()`` of its DataParallel model (``module.`` keys, no wrapper dict) as
    model_state_XX.pytar: ``-e`` reads it, and so does --init-from."""
    torch.manual_seed(3)
    model = create_model("tiny_cnn", 10)
    path = str(tmp_path / "model_state_07.pytar")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    res = train(meal_cfg(world, tmp_path, init_from=None, evaluate=True, resume=path))
    assert res["images"] == 10
    trainer = Trainer(meal_cfg(world, tmp_path, init_from=path))
    assert all(torch.equal(v.cpu(), model.state_dict()[k]) for k, v in trainer.model.state_dict().items())


# ---------------------------------------------------------------------------------------------- resume, DDP
def _state(path):
    ck = torch.load(path, weights_only=True)
    return ck["state_dict"], ck["discriminator"], ck["d_optimizer"]["state"]


@pytest.mark.slow
def test_resume_with_the_discriminator_is_exact(world, tmp_path):
    """Stopped at step 3 (inside the first pass, CutMix on) and resumed: student, discriminator and both
    optimizers as an uninterrupted run's, bit for bit on the CPU; the logs (discriminator loss too) equal."""
    kw = dict(mixup_cutmix=True, mixup=0.0, epochs=3)  # MEAL V2's CutMix; a pass of 4 steps, a 2-step epoch
    train(meal_cfg(world, tmp_path / "a", **kw))
    first = train(meal_cfg(world, tmp_path / "b", max_steps=3, **kw))
    assert first["stopped_early"] and first["global_step"] == 3
    train(meal_cfg(world, tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint.pth.tar"), **kw))
    a, b = _state(tmp_path / "a" / "checkpoint.pth.tar"), _state(tmp_path / "b" / "checkpoint.pth.tar")
    assert_same_weights(a[0], b[0])
    assert_same_weights(a[1], b[1])
    assert_same_weights({k: v["momentum_buffer"] for k, v in a[2].items()},
                        {k: v["momentum_buffer"] for k, v in b[2].items()})
    la = [json.loads(x) for x in open(tmp_path / "a" / "log.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "b" / "log.jsonl")]
    assert all("train_d_loss" in x for x in la)
    if DEVICE == "cpu":
        assert [(x["train_loss"], x["train_d_loss"], x["val_top1"]) for x in la] == \
            [(x["train_loss"], x["train_d_loss"], x["val_top1"]) for x in lb]
    with pytest.raises(TrainError, match="use_discriminator_loss: True -> False"):
        train(meal_cfg(world, tmp_path / "b", use_discriminator_loss=False,
                       resume=str(tmp_path / "b" / "checkpoint.pth.tar")))


@pytest.mark.slow
def test_ddp_keeps_the_discriminators_in_step(world, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath(), FKD_TEST_MEAL_INIT=world["init"])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), os.path.join(ROOT, "tests", "ddp_train_worker.py"), world["data"],
                        world["store"], str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d0, d1 = torch.load(tmp_path / "rank0.disc.pt"), torch.load(tmp_path / "rank1.disc.pt")
    for k in d0["end"]:  # the ranks' discriminators started (seeded per rank) and stayed identical, and moved
        assert torch.equal(d0["start"][k], d1["start"][k]) and torch.equal(d0["end"][k], d1["end"][k]), k
    assert any(not torch.equal(d0["start"][k], d0["end"][k]) for k in d0["end"])
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


# ---------------------------------------------------------------------------------------------- MEAL V2's command line
def meal_v2_readme_command(w, out: str) -> list[str]:
    """MEAL V2's README command for FKD_train.py, word for word but for the sizes (tiny data, tiny student)."""
    return ["--save", out, "--batch-size", "16", "-j", "2", "--model", "tiny_cnn", "--epochs", "2",
            "--teacher-model", "gluon_senet154,gluon_resnet152_v1s", "--imagenet", w["data"], "--num_crops", "2",
            "--soft_label_type", "marginal_smoothing_k5", "--softlabel_path", w["store"], "--schedule", "1", "2",
            "--use-discriminator-loss", "--image-size", "32", "--device", DEVICE]


def test_meal_v2s_readme_command_runs(world, tmp_path, capsys):
    """--imagenet is DATA; --teacher-model is accepted, recorded and said to be unused (MEAL V2's FKD_train.py
    passes it to create_model(..., FKD=True), which ignores it). MEAL V2 starts its student from timm's
    pretrained --model without saying so: here the start is named, and a command without one is refused saying
    which option gives it."""
    cmd = meal_v2_readme_command(world, str(tmp_path / "run"))
    assert main(["train"] + cmd) == 1
    err = capsys.readouterr().err
    assert "--recipe meal-v2 (chosen by MEAL V2's --imagenet, --teacher-model)" in err and "--student-state-file" in err
    assert main(["train"] + cmd + ["--student-state-file", world["init"]]) == 0
    out = capsys.readouterr().out
    assert "recipe meal-v2 (lr 0.01, weight decay 0," in out and "chosen because the command uses MEAL V2's" in out
    assert "--teacher-model gluon_senet154,gluon_resnet152_v1s: accepted for MEAL V2's command line and not used" in out
    ck = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)
    assert ck["config"]["data"] == world["data"] and ck["config"]["unused"] == (
        "--teacher-model gluon_senet154,gluon_resnet152_v1s",)
    assert "discriminator" in ck and ck["epoch"] == 2


def test_meal_v2s_options_choose_its_recipe_and_resume_agrees(world, tmp_path, monkeypatch, capsys):
    """MEAL V2's flags without --recipe train with MEAL V2's lr 0.01 and no weight decay (its opts.py), not FKD's
    0.1 and 1e-4, and the run says so; --lr / --wd given still win. The same command resumes its run; a run made
    with FKD's recipe is refused by the inferred one, naming the --recipe that continues it."""
    got = _parsed("--student-state-file S.pth --use-discriminator-loss --softlabel-path STORE DATA", monkeypatch)
    assert (got.recipe, got.lr, got.weight_decay, got.init_from, got.recipe_from) == \
        ("meal-v2", 0.01, 0.0, "S.pth", ("--student-state-file",))
    got = _parsed("--init-from S.pth --use-discriminator-loss --lr 0.05 --wd 1e-5 --softlabel-path STORE DATA",
                  monkeypatch)
    assert (got.recipe, got.lr, got.weight_decay) == ("meal-v2", 0.05, 1e-5)
    got = _parsed("--use-discriminator-loss --softlabel-path STORE DATA", monkeypatch)  # from scratch: FKD's
    assert (got.recipe, got.lr, got.weight_decay) == ("fkd", 0.1, 1e-4)
    got = _parsed("--student-state-file S.pth --softlabel-path STORE DATA", monkeypatch)  # MEAL V2's default: off
    assert (got.recipe, got.lr, got.use_discriminator_loss) == ("meal-v2", 0.01, False)
    got = _parsed("--recipe meal-v2 --init-from S.pth --softlabel-path STORE DATA", monkeypatch)  # the recipe's: on
    assert got.use_discriminator_loss is True
    got = _parsed("--recipe fkd --student-state-file S.pth --softlabel-path STORE DATA", monkeypatch)
    assert (got.recipe, got.lr, got.recipe_from) == ("fkd", 0.1, ())
    monkeypatch.undo()
    out = str(tmp_path / "run")
    cmd = ["train", "--student-state-file", world["init"], "--use-discriminator-loss", "--softlabel-path",
           world["store"], "-a", "tiny_cnn", "--num-crops", "2", "-b", "16", "--epochs", "2", "--input-size", "32",
           "--device", DEVICE, "--save", out, "-q", world["data"]]
    assert main(cmd + ["--max-steps", "2"]) == 0
    assert "recipe meal-v2 (lr 0.01, weight decay 0," in capsys.readouterr().out
    assert main(cmd + ["--resume", os.path.join(out, "checkpoint.pth.tar")]) == 0
    ck = torch.load(os.path.join(out, "checkpoint.pth.tar"), weights_only=True)
    assert ck["global_step"] == 4 and (ck["config"]["recipe"], ck["config"]["lr"]) == ("meal-v2", 0.01)
    fkd_run = str(tmp_path / "fkd")
    assert main(cmd[:-4] + ["--save", fkd_run, "-q", "--recipe", "fkd", "--max-steps", "1", world["data"]]) == 0
    capsys.readouterr()
    assert main(cmd[:-4] + ["--save", fkd_run, "-q", "--resume", os.path.join(fkd_run, "checkpoint.pth.tar"),
                            world["data"]]) == 1
    err = capsys.readouterr().err
    assert "recipe: 'fkd' -> 'meal-v2'" in err and "pass --recipe fkd to continue this run" in err, err


class _ThousandWay(torch.nn.Module):
    """A teacher of 1000 classes (as MEAL V2's timm ensemble), from the crop's mean colour."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 1000, generator=torch.Generator().manual_seed(4)) * 4)

    def forward(self, x):
        return x.float().mean(dim=(2, 3)) @ self.w


def test_a_1000_class_meal_v2_checkpoint_is_given_the_route_that_works(world, tmp_path):
    """MEAL V2's checkpoints always have 1000 outputs: on a 10-class store the error names the route that works
    (a store generated with --num-classes 1000 by 1000-class teachers), and that route starts the student from
    MEAL V2's weights, tensor for tensor."""
    torch.manual_seed(8)
    student = create_model("tiny_cnn", 1000)
    path = str(tmp_path / "model_state_199.pytar")  # MEAL V2's format: DataParallel's state_dict
    torch.save({"module." + k: v for k, v in student.state_dict().items()}, path)
    with pytest.raises(InitError, match=r"model_state_199.pytar has 1000 classes .* this run has 10 .*give the run "
                                        r"their 1000 classes .*`fkd-dali generate DATA --num-classes 1000 \.\.\.`"):
        Trainer(meal_cfg(world, tmp_path, init_from=path))
    teacher = str(tmp_path / "t1000.pt")
    torch.jit.save(torch.jit.script(_ThousandWay()), teacher)
    store = str(tmp_path / "store1000")
    assert main(["generate", world["data"], "--save-path", store, "-a", "torchscript", "--teacher-path", teacher,
                 "--input-size", "32", "--num-crops", "4", "--num-seg", "4", "--num-classes", "1000",
                 "--device", DEVICE, "-q"]) == 0
    trainer = Trainer(meal_cfg(world, tmp_path, init_from=path, softlabel_path=store, num_crops=4))
    assert trainer.num_classes == 1000
    assert all(torch.equal(v.cpu(), student.state_dict()[k]) for k, v in trainer.model.state_dict().items())
    trainer.close()
