"""The reference-style training loop that bench.py races against: how the original code fed the GPU.

A torchvision-style dataset hands out one PIL image at a time (as ``torchvision.datasets.CIFAR10``
does: ``Image.fromarray`` on an HWC uint8 array), per-sample PIL transforms (RandomCrop with
padding, RandomHorizontalFlip, ToTensor) run in DataLoader workers, every batch is copied to the
device, and the step is plain fp32 SGD in NCHW under PyTorch's default backend settings, reading
the loss back after every step as the original progress printing did.

Only the input pipeline and the step differ from ``fragile.core.training.train_steps``: same model
architecture, same images, same batch size, same loss.
"""
import torch
import torch.nn.functional as F


class PILDataset(torch.utils.data.Dataset):
    """Images as torchvision's datasets keep them (HWC uint8 numpy), turned into PIL images per sample."""

    def __init__(self, split, transform):
        images = split.images.cpu().permute(0, 2, 3, 1).numpy()
        self.images = images[..., 0] if images.shape[-1] == 1 else images  # grayscale: mode "L", like MNIST
        self.labels = split.labels.cpu().tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def reference_transform(spec):
    """The original per-sample pipeline: RandomCrop(padding) + RandomHorizontalFlip + ToTensor, on PIL images."""
    from torchvision import transforms
    steps = []
    if spec.crop_padding:
        steps.append(transforms.RandomCrop(spec.shape[1:], padding=spec.crop_padding))
    if spec.horizontal_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(transforms.ToTensor())  # [0, 1]; the model normalizes inside, as on our path
    return transforms.Compose(steps)


def reference_loader(split, spec, batch_size, num_workers, seed=0):
    """A shuffling DataLoader over PIL images; workers stay alive between epochs (steady state)."""
    return torch.utils.data.DataLoader(
        PILDataset(split, reference_transform(spec)), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=num_workers, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed))


def reference_sgd(model, lr, momentum=0.9, weight_decay=5e-4):
    """torch.optim.SGD with PyTorch's defaults for the implementation, as the original code built it."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def pytorch_default_backends():
    """The backend settings of a script that never touches them (TF32 convolutions on, no autotuning)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = False


def reference_steps(model, optimizer, loader, device):
    """Endless fp32 training steps over ``loader``'s epochs; yields the number of images in each step."""
    model.train()
    while True:
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the original loop accumulated loss.item() for its progress line: a sync per step
            yield len(labels)
