"""Baidu wenxinworkshop v1 (Llama 3 on Qianfan): access_token or AK/SK (bce-auth-v1) auth."""

from adapters.baidu.adapter import BaiduAdapter, build
from adapters.baidu.config import BaiduBackend

Backend = BaiduBackend

__all__ = ["Backend", "BaiduAdapter", "BaiduBackend", "build"]
