"""Request processors: one per admin topic, each calling the ClientAdminInterface."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from engine.admin_defs import Message, MsgHeader, Topic, error_reply, ok_reply
from engine.client.admin import RequestProcessor
from engine.shell import ShellCommandError
from engine.site.admin_interface import AdminError
from engine.site.deploy import DeployError
from engine.site.shell import run_shell_command

__all__ = [
    "AbortClientProcessor",
    "ClientStatusProcessor",
    "DeleteRunNumberProcessor",
    "DeployProcessor",
    "RestartClientProcessor",
    "ShellCommandProcessor",
    "ShutdownClientProcessor",
    "StartClientMGpuProcessor",
    "StartClientProcessor",
    "SysInfoProcessor",
    "ValidateRequestProcessor",
    "all_processors",
    "request_processors",
]


class _Processor(RequestProcessor):
    topic = ""

    def get_topics(self) -> list[str]:
        return [self.topic]

    def process(self, req: Message, app_ctx: Any) -> Message | None:
        try:
            text = self.run(req, app_ctx)
        except (AdminError, DeployError, ShellCommandError) as exc:
            return error_reply(str(exc))
        return ok_reply(f"reply_{self.topic}", text)

    def run(self, req: Message, app_ctx: Any) -> str:
        raise NotImplementedError


class StartClientProcessor(_Processor):
    topic = Topic.START

    def run(self, req: Message, app_ctx: Any) -> str:
        return str(app_ctx.start_client(req.get_header(MsgHeader.RUN_NUMBER)))


class StartClientMGpuProcessor(_Processor):
    topic = Topic.START_MGPU

    def run(self, req: Message, app_ctx: Any) -> str:
        return str(
            app_ctx.start_mgpu_client(
                req.get_header(MsgHeader.RUN_NUMBER), req.get_header("gpu_number")
            )
        )


class AbortClientProcessor(_Processor):
    topic = Topic.ABORT

    def run(self, req: Message, app_ctx: Any) -> str:
        return str(app_ctx.abort_client())


class ClientStatusProcessor(_Processor):
    topic = Topic.CHECK_STATUS

    def run(self, req: Message, app_ctx: Any) -> str:
        return str(app_ctx.client_status())


class ShutdownClientProcessor(_Processor):
    topic = Topic.SHUTDOWN

    def run(self, req: Message, app_ctx: Any) -> str:
        return str(app_ctx.shutdown_client())


class RestartClientProcessor(_Processor):
    topic = Topic.RESTART

    def run(self, req: Message, app_ctx: Any) -> str:
        return str(app_ctx.restart_client())


class DeployProcessor(_Processor):
    topic = Topic.DEPLOY

    def run(self, req: Message, app_ctx: Any) -> str:
        return str(app_ctx.deploy_mmar(req))


class DeleteRunNumberProcessor(_Processor):
    topic = Topic.DELETE_RUN

    def run(self, req: Message, app_ctx: Any) -> str:
        return str(app_ctx.delete_run_number(req.get_header(MsgHeader.RUN_NUMBER)))


class ValidateRequestProcessor(_Processor):
    topic = Topic.VALIDATE

    def run(self, req: Message, app_ctx: Any) -> str:
        return str(app_ctx.do_validate(req))


class ShellCommandProcessor(_Processor):
    """Runs one read-only command, re-validated here: the server's check is not trusted."""

    topic = Topic.SHELL

    def run(self, req: Message, app_ctx: Any) -> str:
        if not isinstance(req.body, str):
            raise ShellCommandError("the shell request carries no command text")
        policy = app_ctx.policy
        return run_shell_command(
            req.body,
            app_ctx.workspace,
            timeout=policy.shell_timeout,
            max_output=policy.shell_max_output,
            env_shown=policy.env_shown,
        )


class SysInfoProcessor(_Processor):
    topic = Topic.SYS_INFO

    def run(self, req: Message, app_ctx: Any) -> str:
        return str(app_ctx.sys_info())


_CLASSES: tuple[type[_Processor], ...] = (
    StartClientProcessor,
    StartClientMGpuProcessor,
    AbortClientProcessor,
    ClientStatusProcessor,
    ShutdownClientProcessor,
    RestartClientProcessor,
    DeployProcessor,
    DeleteRunNumberProcessor,
    ValidateRequestProcessor,
    ShellCommandProcessor,
    SysInfoProcessor,
)


def all_processors() -> list[RequestProcessor]:
    """One instance of every processor (the lineage's ``req_processors``)."""
    return [cls() for cls in _CLASSES]


def request_processors(names: Iterable[str] | None) -> list[RequestProcessor]:
    """The processors a config's ``req_processors`` lists, by Clara's class names; every one
    when ``names`` is None. A topic whose processor is not listed is answered "invalid_request".

    Raises:
        ValueError: an unknown name (the config loader reports these with file and key first).
    """
    if names is None:
        return all_processors()
    by_name = {cls.__name__: cls for cls in _CLASSES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(
            f"unknown request processor {unknown[0]!r}; expected one of {', '.join(by_name)}"
        )
    return [by_name[n]() for n in dict.fromkeys(names)]
