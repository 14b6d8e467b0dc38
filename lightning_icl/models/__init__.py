from .transformer import ICLTransformer

__all__ = ["ICLTransformer"]
