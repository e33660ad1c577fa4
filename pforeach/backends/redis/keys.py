"""Every Redis key and message of the protocol, and the scripts that move them.

All keys of a queue ``Q`` are rooted at its name::

    Q                 list    work queue of task messages (RPUSH in, LMOVE out)
    Q.live            string  exists while the queue is open
    Q.count           string  workers registered on the queue (an estimate)
    Q.workers         set     ids of registered workers
    Q.worker.W        hash    worker W: host, pid, queues, task ... (TTL)
    Q.proc.W          list    the task worker W has taken (reliable queue)
    Q.env.H           string  a job environment, named by its content hash H
    Q.jobs            set     ids of running jobs
    Q.job.J           hash    job J: user, host, counts ... (TTL, refreshed)
    Q.attempts.J      hash    task id -> times the task was taken
    Q.start.J.T       string  task T of job J started: "worker-id start-time"
    Q.alive.J.T       string  task T is alive (short TTL, refreshed)
    Q.out.J           list    result messages of job J
    K.part.N          string  part N of a value at key K too large for one key

One task, from master to worker and back::

    master                         Redis                           worker
    SET Q.env.H (unless present)
    HSET Q.job.J
    RPUSH task ------------------> Q
                                   Q --TAKE: LMOVE to Q.proc.W,
                                        SET start, SET alive,
                                        HINCRBY attempts ---------> (message)
                                   Q.env.H --------(once per H)--> cache
                                                                    run body
                                   Q.out.J <--FINISH: RPUSH result
                                        if Q.job.J exists; DEL start,
                                        alive, Q.proc.W ----------- result
    LPOP/BLPOP <------------------ Q.out.J

A taken task is never only in a worker's memory: TAKE moves it into the
worker's processing list atomically. When a worker dies, whoever notices (its
supervisor at once, or a master's fault check after the alive key expires)
moves it back to the front of the queue with RECLAIM or REQUEUE.

Messages are bytes with a text header that the scripts can parse::

    task:    b"PFT1 <job> <task> <env> <attempts> <timeout> <seed> <np seed> <span>\\n" + blob
    result:  b"PFR1 <job> <task> <worker id>\\n" + blob
    notice:  b"PFN1 <job> <task> <worker id>\\n" + text   (unsigned: "I could not read it")

A *blob* is ``b"=" + sealed payload`` or, for a payload above the part size,
``b"#<n>"`` with the sealed payload cut into ``n`` part keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ... import serialize
from ...errors import OptionError, PayloadError
from ...job import TaskResult

TASK_TAG = b"PFT1"
RESULT_TAG = b"PFR1"
NOTICE_TAG = b"PFN1"

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_:\-]{1,200}$")


def check_queue_name(queue: str) -> str:
    """Returns ``queue`` if it is a valid queue name, else raises OptionError.

    Names are letters, digits, ``_``, ``:`` and ``-``: a ``.`` or a space
    would make one queue's keys collide with another's.
    """
    if not isinstance(queue, str) or not _QUEUE_NAME.match(queue):
        raise OptionError(
            f"invalid queue name {queue!r}: use 1 to 200 letters, digits, '_', ':' "
            "or '-' (a '.' or a space would break the key layout)"
        )
    return queue


class Keys:
    """The names of every key of one queue."""

    def __init__(self, queue: str) -> None:
        self.queue = check_queue_name(queue)
        self.live = f"{queue}.live"
        self.count = f"{queue}.count"
        self.workers = f"{queue}.workers"
        self.jobs = f"{queue}.jobs"

    def worker(self, wid: str) -> str:
        return f"{self.queue}.worker.{wid}"

    def proc(self, wid: str) -> str:
        return f"{self.queue}.proc.{wid}"

    def reclaim_keys(self, wid: str) -> list[str]:
        """The KEYS of the RECLAIM script for worker ``wid``."""
        return [self.queue, self.proc(wid), self.worker(wid), self.workers, self.count]

    def env(self, env_hash: str) -> str:
        return f"{self.queue}.env.{env_hash}"

    def job(self, job_id: str) -> str:
        return f"{self.queue}.job.{job_id}"

    def attempts(self, job_id: str) -> str:
        return f"{self.queue}.attempts.{job_id}"

    def start(self, job_id: str, task_id: int) -> str:
        return f"{self.queue}.start.{job_id}.{task_id}"

    def alive(self, job_id: str, task_id: int) -> str:
        return f"{self.queue}.alive.{job_id}.{task_id}"

    def out(self, job_id: str) -> str:
        return f"{self.queue}.out.{job_id}"

    def task_value(self, job_id: str, task_id: int) -> str:
        """Where the parts of a task message too large for one key go."""
        return f"{self.queue}.task.{job_id}.{task_id}"

    def result_value(self, job_id: str, task_id: int, wid: str) -> str:
        """Where the parts of a result too large for one key go."""
        return f"{self.queue}.result.{job_id}.{task_id}.{wid}"

    def identity(self, kind: str, *parts: object) -> str:
        """What a sealed payload is bound to, so it cannot be moved elsewhere."""
        return "/".join([self.queue, kind, *map(str, parts)])

    def job_pattern(self, kind: str, job_id: str) -> str:
        """A SCAN pattern for per-task keys (start, alive) of a job."""
        return f"{self.queue}.{kind}.{job_id}.*"


def part_key(key: str, number: int) -> str:
    return f"{key}.part.{number}"


# -- message headers ---------------------------------------------------------------


@dataclass(frozen=True)
class TaskHeader:
    """The parsed first line of a task message."""

    job_id: str
    task_id: int
    env_hash: str
    max_attempts: int
    timeout: float | None
    seed: int
    np_seed: int | None
    span: str = "-"  # the task's iterations, "first-last", for job control

    def encode(self) -> bytes:
        timeout = "-" if self.timeout is None else repr(float(self.timeout))
        np_seed = "-" if self.np_seed is None else str(self.np_seed)
        return b"%s %s %d %s %d %s %d %s %s\n" % (
            TASK_TAG,
            self.job_id.encode(),
            self.task_id,
            self.env_hash.encode(),
            self.max_attempts,
            timeout.encode(),
            self.seed,
            np_seed.encode(),
            self.span.encode(),
        )


def split_message(message: bytes, tag: bytes) -> tuple[list[str], bytes]:
    """Splits a message into its header fields and its body.

    Raises:
        PayloadError: not a message of the expected kind.
    """
    head, sep, body = message.partition(b"\n")
    fields = head.split(b" ")
    if not sep or fields[0] != tag:
        raise PayloadError(f"not a {tag.decode()} message: {message[:40]!r}")
    try:
        return [f.decode("ascii") for f in fields[1:]], body
    except UnicodeDecodeError:
        raise PayloadError(f"malformed {tag.decode()} header: {head[:80]!r}") from None


# What each task header field may hold. The job id must also satisfy the
# scripts' Lua pattern (%w+), so that a message one side accepts the other does.
_ID = re.compile(r"[A-Za-z0-9]{1,64}")
_COUNT = re.compile(r"[0-9]{1,20}")
_SPAN = re.compile(r"-|[0-9]{1,20}(-[0-9]{1,20})?")


def parse_task(message: bytes) -> tuple[TaskHeader, bytes]:
    """Parses a task message into its header and its blob.

    Every field is checked, because the header is read before the payload's
    signature is: a bad one must fail here, not later in the worker or its
    supervisor (a time limit of ``nan``, say, would stop a worker at once).

    Raises:
        PayloadError: not a task message, or a field is malformed.
    """
    fields, body = split_message(message, TASK_TAG)
    try:
        job, task, env_hash, attempts, timeout, seed, np_seed, span = fields
        if not (
            _ID.fullmatch(job)
            and _ID.fullmatch(env_hash)
            and _SPAN.fullmatch(span)
            and all(_COUNT.fullmatch(f) for f in (task, attempts, seed))
            and (np_seed == "-" or _COUNT.fullmatch(np_seed))
        ):
            raise ValueError(job)
        limit = None if timeout == "-" else float(timeout)
        if limit is not None and not 0 < limit < float("inf"):
            raise ValueError(timeout)
        header = TaskHeader(
            job,
            int(task),
            env_hash,
            int(attempts),
            limit,
            int(seed),
            None if np_seed == "-" else int(np_seed),
            span,
        )
    except ValueError:
        raise PayloadError(f"malformed task header: {fields!r}"[:300]) from None
    return header, body


def encode_outcome(kind: str, value: Any) -> bytes:
    """A result payload: ``ok`` with a TaskResult, ``fail`` with an exception,
    or ``noenv``."""
    body = value.dumps() if isinstance(value, TaskResult) else serialize.dumps(value)
    return kind.encode() + b"\n" + body


def decode_outcome(payload: bytes | memoryview) -> tuple[str, Any]:
    """The inverse of :func:`encode_outcome`."""
    data = bytes(payload)
    kind, _, body = data.partition(b"\n")
    if kind not in (b"ok", b"fail", b"noenv"):
        raise PayloadError(f"unknown result kind {kind[:20]!r}")
    value = serialize.loads(body)
    # The kind promises a type; a result that breaks the promise is as
    # unusable as one that does not unpickle.
    expected = {b"ok": TaskResult, b"fail": BaseException, b"noenv": type(None)}[kind]
    if not isinstance(value, expected):
        raise PayloadError(
            f"a {kind.decode()!r} result holds a {type(value).__name__}, "
            f"not a {expected.__name__}"
        )
    return kind.decode(), value


def result_message(
    tag: bytes, job_id: str, task_id: int, wid: str, body: bytes
) -> bytes:
    return b"%s %s %d %s\n" % (tag, job_id.encode(), task_id, wid.encode()) + body


def parse_result(message: bytes) -> tuple[bytes, str, int, str, bytes]:
    """Parses a result or notice message: (tag, job, task, worker id, body)."""
    tag = message[:4]
    fields, body = split_message(
        message, tag if tag in (RESULT_TAG, NOTICE_TAG) else RESULT_TAG
    )
    try:
        job, task, wid = fields
        return tag, job, int(task), wid, body
    except ValueError:
        raise PayloadError(f"malformed result header: {fields!r}") from None


# -- scripts -------------------------------------------------------------------------

# Lua patterns shared by the scripts: the job and task ids of a task message.
_PARSE = "string.match(msg, '^PFT1 (%w+) (%d+) ')"

TAKE = f"""
-- KEYS: queue1, proc1, queue2, proc2, ...
-- ARGV: worker id, now, alive ttl, start ttl, mode ('take' | 'mark'), index
-- Takes the first task of the first non-empty queue into the worker's
-- processing list ('take'), or marks the task a blocking move already put
-- there ('mark'); records start and alive keys and counts the attempt.
-- Returns {{index, message, attempt}}: attempt 0 means the job is gone and the
-- task was dropped, -1 that the message could not be parsed.
local function mark(i, msg)
  local q = KEYS[2 * i - 1]
  local job, task = {_PARSE}
  if not job then return {{i, msg, -1}} end
  if redis.call('EXISTS', q .. '.job.' .. job) == 0 then
    redis.call('DEL', KEYS[2 * i])
    return {{i, '', 0}}
  end
  local id = job .. '.' .. task
  redis.call('SET', q .. '.start.' .. id, ARGV[1] .. ' ' .. ARGV[2], 'EX', ARGV[4])
  redis.call('SET', q .. '.alive.' .. id, ARGV[1], 'EX', ARGV[3])
  local n = redis.call('HINCRBY', q .. '.attempts.' .. job, task, 1)
  -- The counters last as long as the job's record (which its master keeps
  -- alive), so that they go with it when the master is gone.
  local ttl = redis.call('PTTL', q .. '.job.' .. job)
  if ttl > 0 then
    redis.call('PEXPIRE', q .. '.attempts.' .. job, ttl)
  else
    redis.call('EXPIRE', q .. '.attempts.' .. job, ARGV[4])
  end
  return {{i, msg, n}}
end
if ARGV[5] == 'mark' then
  local i = tonumber(ARGV[6])
  local msg = redis.call('LINDEX', KEYS[2 * i], -1)
  if not msg then return false end
  return mark(i, msg)
end
for i = 1, #KEYS / 2 do
  local msg = redis.call('LMOVE', KEYS[2 * i - 1], KEYS[2 * i], 'LEFT', 'RIGHT')
  if msg then return mark(i, msg) end
end
return false
"""

FINISH = """
-- KEYS: out, start, alive, proc, job record   ARGV: message, result ttl, worker id
-- Pushes a result if its job still exists and clears the task's keys. The
-- start and alive keys are cleared only while they are this worker's: one
-- taken for dead that finishes late must not erase the marks of the worker
-- now running the task again (the master would think that run lost too).
local wid = ARGV[3]
local start = redis.call('GET', KEYS[2])
if start and (not wid or string.sub(start, 1, #wid + 1) == wid .. ' ') then
  redis.call('DEL', KEYS[2])
end
local alive = redis.call('GET', KEYS[3])
if alive and (not wid or alive == wid) then redis.call('DEL', KEYS[3]) end
redis.call('DEL', KEYS[4])
if redis.call('EXISTS', KEYS[5]) == 0 then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
-- Results last as long as the job's record (which its master keeps alive):
-- a master that is gone leaves none behind for longer than its key_ttl.
local ttl = redis.call('PTTL', KEYS[5])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

RECLAIM = f"""
-- KEYS: queue, proc, worker key, workers set, count
-- ARGV: worker id, force ('1': the caller knows the worker is gone),
--       uncount ('1': a hand-back, not a failure: the attempt does not count)
-- Moves every task of a dead (or stopping) worker back to the front of the
-- queue, clears their start and alive keys, and unregisters the worker.
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local q = KEYS[1]
local items = redis.call('LRANGE', KEYS[2], 0, -1)
for idx = #items, 1, -1 do
  local msg = items[idx]
  local job, task = {_PARSE}
  if job then
    redis.call('DEL', q .. '.start.' .. job .. '.' .. task, q .. '.alive.' .. job .. '.' .. task)
    if ARGV[3] == '1' then redis.call('HINCRBY', q .. '.attempts.' .. job, task, -1) end
    redis.call('LPUSH', q, msg)
  end
end
redis.call('DEL', KEYS[2], KEYS[3])
if redis.call('SREM', KEYS[4], ARGV[1]) == 1 and redis.call('GET', KEYS[5]) then
  if tonumber(redis.call('DECR', KEYS[5])) < 0 then redis.call('SET', KEYS[5], 0) end
end
return #items
"""

REQUEUE = """
-- KEYS: queue, proc of the worker that held it, start, alive   ARGV: message
-- Puts one task whose worker stopped answering back at the queue's front,
-- unless it finished or got a heartbeat since the master looked (returns 0):
-- the check and the move are one step, so a task is never put back twice.
if redis.call('EXISTS', KEYS[3]) == 0 or redis.call('EXISTS', KEYS[4]) == 1 then
  return 0
end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
"""

# Lua: extends the TTL of a value and, when it is stored in parts (a blob
# "#<n>"), of each of its parts. Returns 1 if the value exists.
_TOUCH = """
local function touch(key, ttl)
  if redis.call('EXPIRE', key, ttl) == 0 then return 0 end
  local head = redis.call('GETRANGE', key, 0, 11)
  if string.sub(head, 1, 1) == '#' then
    for n = 0, (tonumber(string.sub(head, 2)) or 0) - 1 do
      redis.call('EXPIRE', key .. '.part.' .. n, ttl)
    end
  end
  return 1
end
"""

TOUCH_VALUE = (
    _TOUCH
    + """
-- KEYS: a value   ARGV: ttl
-- 1 if the value (with all its parts) exists and now lives ttl more seconds.
return touch(KEYS[1], ARGV[1])
"""
)

KEEP_JOB = (
    _TOUCH
    + """
-- KEYS: job record, env, out, attempts   ARGV: key ttl, env ttl, field, value, ...
-- Extends the TTLs of a running job's keys and updates its progress, only
-- while its record exists: a removed job's record must not come back.
-- Returns 0 if the record is gone.
touch(KEYS[2], ARGV[2])
if redis.call('EXPIRE', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[1])
if #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
return 1
"""
)

JOB_QUEUED = """
-- KEYS: queue   ARGV: job id
-- 1 if a task of the job waits in the queue, else 0. Read in slices and
-- stops at the first one, so a long queue is never copied whole.
local prefix = 'PFT1 ' .. ARGV[1] .. ' '
for first = 0, redis.call('LLEN', KEYS[1]) - 1, 1000 do
  for _, msg in ipairs(redis.call('LRANGE', KEYS[1], first, first + 999)) do
    if string.sub(msg, 1, #prefix) == prefix then return 1 end
  end
end
return 0
"""

DROP_JOB = """
-- KEYS: queue, out, job record, attempts, jobs set   ARGV: job id
-- Removes a job: its queued tasks, its result list, record and counters.
-- Returns how many queued tasks were removed.
local prefix = 'PFT1 ' .. ARGV[1] .. ' '
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local keep, removed = {}, 0
for _, msg in ipairs(items) do
  if string.sub(msg, 1, #prefix) == prefix then removed = removed + 1
  else keep[#keep + 1] = msg end
end
if removed > 0 then
  redis.call('DEL', KEYS[1])
  for i = 1, #keep, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(keep, i, math.min(i + 999, #keep)))
  end
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('SREM', KEYS[5], ARGV[1])
return removed
"""

# Raw: the Lua pattern needs the two characters backslash and n.
SNAPSHOT = r"""
-- KEYS: queue   ARGV: '1' to count the queued tasks of each job
-- Reads all that job control reports about a queue in one atomic step, so
-- that its numbers agree with each other. Writes nothing. Returns
-- {exists, jobs, workers, held, queued, length}:
--   exists   how many of Q, Q.live, Q.workers, Q.jobs exist
--   jobs     {job id, HGETALL of Q.job.J} for each id in Q.jobs
--   workers  {worker id, HGETALL of Q.worker.W} for each registered worker
--            whose record has not expired
--   held     {worker id, task header, start value, alive PTTL, attempts} for
--            each task in a processing list whose alive key exists
--   queued   job id, count, job id, count ... (only if ARGV[1] is '1')
local q = KEYS[1]
local exists = redis.call('EXISTS', q, q .. '.live', q .. '.workers', q .. '.jobs')
local jobs = {}
for _, id in ipairs(redis.call('SMEMBERS', q .. '.jobs')) do
  jobs[#jobs + 1] = {id, redis.call('HGETALL', q .. '.job.' .. id)}
end
local workers, held = {}, {}
for _, wid in ipairs(redis.call('SMEMBERS', q .. '.workers')) do
  local record = redis.call('HGETALL', q .. '.worker.' .. wid)
  if #record > 0 then workers[#workers + 1] = {wid, record} end
  for _, msg in ipairs(redis.call('LRANGE', q .. '.proc.' .. wid, 0, -1)) do
    local head = string.match(msg, '^[^\n]*')
    local job, task = string.match(head, '^PFT1 (%w+) (%d+) ')
    if job then
      local id = job .. '.' .. task
      local ttl = redis.call('PTTL', q .. '.alive.' .. id)
      if ttl ~= -2 then
        held[#held + 1] = {
          wid, head, redis.call('GET', q .. '.start.' .. id) or '', ttl,
          redis.call('HGET', q .. '.attempts.' .. job, task) or ''}
      end
    end
  end
end
local queued = {}
if ARGV[1] == '1' then
  -- In slices, so that a long queue is never copied whole at once.
  local counts = {}
  for first = 0, redis.call('LLEN', q) - 1, 1000 do
    for _, msg in ipairs(redis.call('LRANGE', q, first, first + 999)) do
      local job = string.match(msg, '^PFT1 (%w+) ')
      if job then counts[job] = (counts[job] or 0) + 1 end
    end
  end
  for job, n in pairs(counts) do
    queued[#queued + 1] = job
    queued[#queued + 1] = n
  end
end
return {exists, jobs, workers, held, queued, redis.call('LLEN', q)}
"""
