"""Framework integrations, imported as ``cam_plugin.integrations.<name>``.

Each module imports its framework at import time, so import one only when you use
it; the registry imports the adapters of timm / torchvision / mmpretrain / mmdet
automatically when it meets a model of that package.
"""
