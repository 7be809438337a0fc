"""A stand-in for the accelerator's CUDA calls (`CudaOps`) that checks the copy protocol on the CPU.

Work queued on a stream runs only when something waits for it (a host wait on an event, or another stream's queued
wait reaching it), as on a GPU that lags the host; the allocator poisons a freed copy's memory (NaN) as soon as the
streams it was recorded on let the block be reused. So a copy read before it landed, a staging buffer refilled
before its copy left it, or a copy freed while compute still reads it shows up as compute reading wrong numbers
(`FakeGPU.errors`).
"""

import weakref
from dataclasses import dataclass, field

import torch

from tiermoe.offload.tiers.store import ExpertWeights


class Stream:
    """A queue of work that runs in order, only as far as something waits for."""

    def __init__(self, name: str):
        self.name = name
        self.queue: list = []
        self.done = 0  # how much of `queue` has run
        self.waits_for: dict[str, int] = {}  # stream name -> queue position this stream's later work waits for

    def enqueue(self, work) -> int:
        self.queue.append(work)
        return len(self.queue)

    def run_to(self, position: int | None = None) -> None:
        position = len(self.queue) if position is None else position
        while self.done < position:
            self.done += 1
            self.queue[self.done - 1]()


@dataclass
class Event:
    stream: Stream | None = None  # where it was last recorded (None: never)
    position: int = 0


@dataclass
class Block:
    """One device allocation as the caching allocator sees it."""

    memory: torch.Tensor  # flat; the tensor handed out is a view of it
    stream: Stream  # allocated on
    written: int  # queue position of its copy on `stream`
    recorded: set = field(default_factory=set)  # streams given through record_stream
    last_use: dict = field(default_factory=dict)  # stream -> queue position of its latest read there


class FakeGPU:
    """`CudaOps` on the CPU, recording what the protocol must get right (see the module doc)."""

    def __init__(self):
        self.copy_stream, self.compute = Stream("copy"), Stream("compute")
        self.blocks: dict[int, Block] = {}
        self.errors: list[str] = []
        self.host_waits = 0  # times the host blocked on the device
        self.freed_in_use = 0  # copies freed while work reading them was still queued
        self.uses = 0  # reads the compute stream ran

    def compute_stream(self) -> Stream:
        return self.compute

    def new_event(self) -> Event:
        return Event()

    def record(self, event: Event, stream: Stream) -> None:
        event.stream, event.position = stream, len(stream.queue)

    def host_wait(self, event: Event) -> None:
        if event.stream is not None and event.stream.done < event.position:
            self.host_waits += 1
            event.stream.run_to(event.position)

    def stream_wait(self, stream: Stream, event: Event) -> None:
        if event.stream is None:
            return
        source, position = event.stream, event.position
        stream.waits_for[source.name] = max(stream.waits_for.get(source.name, 0), position)
        stream.enqueue(lambda: source.run_to(position))

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_to_device(self, src: torch.Tensor, stream: Stream) -> torch.Tensor:
        memory = torch.empty(src.numel(), dtype=src.dtype)
        out = memory.view(src.shape)
        written = stream.enqueue(lambda: memory.view(src.shape).copy_(src))  # reads the staging buffer when it runs
        self.blocks[id(out)] = Block(memory, stream, written)
        weakref.finalize(out, self._freed, id(out))
        return out

    def record_stream(self, t: torch.Tensor, stream: Stream) -> None:
        self.blocks[id(t)].recorded.add(stream)

    def _freed(self, key: int) -> None:
        block = self.blocks.pop(key)
        self.freed_in_use += any(s.done < p for s, p in block.last_use.items())
        poison = block.memory.fill_
        protected = [s for s in block.recorded if s is not block.stream]  # the allocating stream is ordered anyway
        if not protected:
            poison(float("nan"))  # reusable at once: the next allocation may overwrite it
        for s in protected:
            s.enqueue(lambda: poison(float("nan")))  # reusable once the work queued there by now has run

    def launch(self, w: ExpertWeights, expected: ExpertWeights) -> None:
        """The model computing with `w` on the compute stream: queued now, run when the compute stream advances."""
        for t, ref in ((w.gate_up, expected.gate_up), (w.down, expected.down)):
            block = self.blocks.get(id(t))
            if block is None:
                continue  # a host tensor: the CPU computes it
            if self.compute.waits_for.get(block.stream.name, 0) < block.written:
                self.errors.append("the compute stream used a copy before waiting for it")
            block.last_use[self.compute] = self.compute.enqueue(lambda b=block, r=ref: self._read(b, r))

    def _read(self, block: Block, expected: torch.Tensor) -> None:
        self.uses += 1
        if not torch.equal(block.memory.view(expected.shape), expected):
            self.errors.append("the compute stream read numbers other than the expert's")

    def finish(self) -> None:
        self.compute.run_to()
        self.copy_stream.run_to()
