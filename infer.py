"""Reload checkpoints and judge them: test metrics, reports, and faces in your own photos.

    python3 infer.py --checkpoint checkpoint/RUN/vgg2_0_2_best.pth -d synthetic
"""
import numpy as np
import torch
import torch.nn.functional as F

from models import FerNet
from train import load_checkpoint


def model_from_checkpoint(ckpt, device="cpu"):
    """Rebuild the model a checkpoint holds (its name and normalisation come from the file)."""
    model = FerNet(ckpt["model_name"])
    state = {k: v.float() for k, v in ckpt["model_state"].items()}  # fp16-stored files too
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.inference_mode()
def predict(models, images, batch_size=512, device="cpu"):
    """Class probabilities (N, 7) for uint8 faces (N, 48, 48), averaged over `models`."""
    device = torch.device(device)
    images = torch.as_tensor(images)
    probs = torch.zeros(len(images), 7, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).unsqueeze(1).float().div_(255)
        p = sum(F.softmax(m(x).float(), 1) for m in models) / len(models)
        probs[start:start + batch_size] = p.double().cpu()
    return probs.numpy()


def evaluate_split(checkpoint_paths, images, labels, batch_size=512, device="cpu"):
    """Loss and accuracy of the (averaged) checkpoints on uint8 faces and labels."""
    models = [model_from_checkpoint(load_checkpoint(p), device) for p in checkpoint_paths]
    probs = predict(models, images, batch_size, device)
    labels = np.asarray(labels)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    accuracy = float((probs.argmax(1) == labels).mean())
    return {"loss": loss, "accuracy": accuracy, "n": int(len(labels))}
