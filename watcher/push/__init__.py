"""What watcher pushes out: webhooks to the app (webhooks.py), notifications to operators
(notifications.py). Built by watcher/service.py from the settings; both run on threads of
their own and read only what the core recorded or logged, so neither can slow scanning.
"""

from __future__ import annotations

from watcher.push.notifications import Notifier
from watcher.push.webhooks import WebhookSender
from watcher.recording import Recorder
from watcher.settings import Settings


class Push:
    def __init__(self, settings: Settings, recorder: Recorder) -> None:
        s = settings
        self.webhooks: WebhookSender | None = None
        self.notifier: Notifier | None = None
        if s.webhook_url and recorder.store is not None:
            self.webhooks = WebhookSender(
                recorder.store,
                s.webhook_url,
                s.webhook_key(),
                max_attempts=s.webhook_max_attempts,
                max_backoff_s=s.webhook_max_backoff_s,
                timeout_s=s.webhook_timeout_s,
            )
            recorder.listeners.append(self.webhooks.recorded)
        if s.notify_urls:
            self.notifier = Notifier(s.notify_urls, s.notify_batch_s)

    def start_notifier(self) -> None:
        """First of all: it listens to the log, so it hears about clamd at start too."""
        if self.notifier is not None:
            self.notifier.start()

    def start(self) -> None:
        """Once the verdict store is open (the daemon's start)."""
        if self.webhooks is not None:
            self.webhooks.start()

    def close(self) -> None:
        if self.webhooks is not None:
            self.webhooks.stop()
        if self.notifier is not None:
            self.notifier.stop()
