"""Telegram gateway for loom-ops (python-telegram-bot); the gateway lands in a later issue."""
