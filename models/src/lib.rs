//! ResNet-family models in tch (see the models issue); weights interchangeable with torchvision/timm.
