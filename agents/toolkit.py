"""`MedPLIBToolkit`: the medplib tools of one agent run, bound to one backend and one image store.

    toolkit = MedPLIBToolkit.from_model(medplib.load("tiny"), decoding={"max_new_tokens": 64})
    toolkit = MedPLIBToolkit.from_url("http://127.0.0.1:8000")   # or a `medplib serve` server
    scan = toolkit.images.put("chest.dcm")          # 'img-1', what the agent is told
    agent = create_agent(chat_model, toolkit.get_tools())

Build one toolkit per agent run (one image store per run) around the model a process loads once:
backends serialise their calls per model, however many toolkits share it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, BaseToolkit, ToolException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medplib.agents.backends import Backend, InProcessBackend
from medplib.agents.expert_tools import plugin_capability_tools
from medplib.agents.image_store import ImageStore
from medplib.agents.tools import BUILTIN_TOOLS, describe_invalid_arguments
from medplib.agents.volume_tools import VOLUME_TOOLS
from medplib.core import plugins
from medplib.core.errors import MedplibError, validation_message
from medplib.core.queries import Decoding

if TYPE_CHECKING:
    from medplib.core.assistant import MedPLIB


class MedPLIBToolkit(BaseToolkit):
    """`medical_vqa`, `medical_region_vqa`, `medical_grounding`, `medical_volume_grounding`, a tool per
    capability of each plugin expert the model holds (`agents/expert_tools.py`), and the tools plugins
    register."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    backend: Backend = Field(description="where answers come from: the in-process model or a server")
    images: ImageStore = Field(
        default_factory=ImageStore, description="the images the tools' `image` ids refer to"
    )
    decoding: dict[str, Any] = Field(
        default_factory=dict, description="decoding options of every call: max_new_tokens, temperature, ..."
    )
    handle_tool_error: bool = Field(
        default=True,
        description="give errors back to the agent as error ToolMessages (False: raise ToolException, "
        "or pydantic's ValidationError for arguments that do not fit the schema)",
    )
    include_plugin_tools: bool = Field(
        default=True,
        description="add a tool per capability of each plugin expert the model holds, and the tools "
        "plugins register through `medplib_register_tools`",
    )

    @field_validator("decoding")
    @classmethod
    def _check_decoding(cls, decoding: dict[str, Any]) -> dict[str, Any]:
        Decoding.from_options(**decoding)  # fail when the toolkit is made, not on the agent's first call
        return decoding

    @classmethod
    def from_model(cls, model: MedPLIB, **fields: Any) -> MedPLIBToolkit:
        """Tools answered by `model` in this process; `fields` are the toolkit's other fields."""
        return cls(backend=InProcessBackend(model), **fields)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        upload: bool = True,
        **fields: Any,
    ) -> MedPLIBToolkit:
        """Tools answered by a `medplib serve` server at `url`. With `upload`, images and masks the agent
        names by path or URI are read here and sent inline; without, the server reads them."""
        from medplib.agents.serve.client import MedPLIBClient
        from medplib.agents.serve.http_backend import HTTPBackend

        client = MedPLIBClient(url, api_key=api_key, timeout=timeout)
        return cls(backend=HTTPBackend(client, upload=upload), **fields)

    def get_tools(self) -> list[BaseTool]:
        tools: list[BaseTool] = [
            tool(
                backend=self.backend,
                images=self.images,
                decoding=self.decoding,
                handle_tool_error=self.handle_tool_error,
                handle_validation_error=describe_invalid_arguments if self.handle_tool_error else False,
            )
            for tool in (*BUILTIN_TOOLS, *VOLUME_TOOLS)
        ]
        if self.include_plugin_tools:
            names = {tool.name for tool in tools}
            capability_tools = plugin_capability_tools(
                self.backend,
                images=self.images,
                decoding=self.decoding,
                handle_tool_error=self.handle_tool_error,
                handle_validation_error=describe_invalid_arguments if self.handle_tool_error else False,
            )
            for capability_tool in capability_tools:
                if capability_tool.name in names:
                    warnings.warn(
                        f"capability tool {capability_tool.name!r} skipped: a tool of that name exists",
                        stacklevel=2,
                    )
                    continue
                tools.append(capability_tool)
                names.add(capability_tool.name)
            for name, tool in plugins.get_tools().items():
                if name in names:  # a plugin cannot replace a built-in tool an agent relies on
                    warnings.warn(
                        f"plugin tool {name!r} skipped: medplib has a tool of that name", stacklevel=2
                    )
                    continue
                tools.append(PluginTool.bind(tool, self.backend, self.images, self.handle_tool_error))
        return tools


class PluginTool(BaseTool):
    """A plugin's tool as a toolkit hands it out: a copy bound to the run's backend and image store
    (where the tool declares `backend` / `images` fields), called only after the plugins'
    `medplib_before_tool_call` hook has seen its arguments, as the built-in tools are."""

    inner: BaseTool = Field(exclude=True)

    @classmethod
    def bind(
        cls, tool: BaseTool, backend: Backend, images: ImageStore, handle_tool_error: bool
    ) -> PluginTool:
        run = {"backend": backend, "images": images}
        update = {name: value for name, value in run.items() if name in type(tool).model_fields}
        inner = tool.model_copy(update=update) if update else tool  # the registered tool stays unbound
        return cls(
            name=tool.name,
            description=tool.description,
            args_schema=tool.args_schema or tool.get_input_schema(),
            response_format=tool.response_format,
            return_direct=tool.return_direct,
            handle_tool_error=handle_tool_error or tool.handle_tool_error,
            inner=inner,
        )

    def _hooked(self, arguments: dict[str, Any]) -> dict[str, Any]:
        try:
            plugins.before_tool_call(self.name, arguments)
        except MedplibError as exc:
            raise ToolException(f"{self.name} was refused: {exc}") from exc
        schema = self.args_schema
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            try:  # a plugin may have edited the arguments: they must still be valid
                schema.model_validate(arguments)
            except ValidationError as exc:
                raise ToolException(f"a plugin left invalid arguments: {validation_message(exc)}") from None
        return arguments

    def _run(self, *args: Any, config: RunnableConfig, run_manager: Any = None, **kwargs: Any) -> Any:
        arguments = self._hooked(dict(kwargs))
        return self.inner._run(*args, **arguments, **_context(self.inner._run, config, run_manager))

    async def _arun(self, *args: Any, config: RunnableConfig, run_manager: Any = None, **kwargs: Any) -> Any:
        arguments = self._hooked(dict(kwargs))
        return await self.inner._arun(*args, **arguments, **_context(self.inner._arun, config, run_manager))


def _context(method: Callable[..., Any], config: RunnableConfig, run_manager: Any) -> dict[str, Any]:
    """The `config` and `run_manager` a tool's `_run` takes, as LangChain would pass them."""
    parameters = inspect.signature(method).parameters
    passed = {"config": config, "run_manager": run_manager}
    return {name: value for name, value in passed.items() if name in parameters}
