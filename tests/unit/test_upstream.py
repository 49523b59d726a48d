"""The gateway's HTTP/1.1 client against a scripted server: framing, reuse, retries, timeouts, the pool."""

from __future__ import annotations

import asyncio

import pytest

from common.errors import UpstreamError, UpstreamTimeout
from common.upstream import Timeouts, Upstream
from tests.support.scripted_http import Exchange, ScriptedServer, response


async def fetch(upstream: Upstream, url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    async with upstream.request(method, url, body) as answer:
        return answer.status, await answer.read()


async def test_upstream_chunked_with_extensions_and_trailers_then_reuse() -> None:
    async def script(exchange: Exchange) -> None:
        await exchange.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5;name=value\r\nhello\r\n6 ; x="y"\r\n world\r\n0\r\nX-Checksum: abc\r\nX-More: 1\r\n\r\n'
        )

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        assert await fetch(upstream, server.url + "/a") == (200, b"hello world")
        assert await fetch(upstream, server.url + "/b") == (200, b"hello world")
        assert server.connections == 1, "a chunked answer read to its end leaves a reusable connection"
        await upstream.close()


async def test_upstream_split_reads_byte_by_byte() -> None:
    payload = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"

    async def script(exchange: Exchange) -> None:
        for index in range(len(payload)):
            await exchange.send(payload[index : index + 1])
            await asyncio.sleep(0)

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        assert await fetch(upstream, server.url) == (200, b"abcde")
        await upstream.close()


async def test_upstream_keep_alive_reuses_one_connection_for_content_length_answers() -> None:
    async def script(exchange: Exchange) -> None:
        await exchange.send(response(b"ok:" + exchange.body))

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        for index in range(5):
            assert await fetch(upstream, server.url, "POST", str(index).encode()) == (200, f"ok:{index}".encode())
        assert server.connections == 1
        await upstream.close()


async def test_upstream_early_close_mid_body_is_a_backend_error_and_not_pooled() -> None:
    async def script(exchange: Exchange) -> None:
        await exchange.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        exchange.close()

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        with pytest.raises(UpstreamError, match="closed the connection"):
            await fetch(upstream, server.url)
        assert upstream.idle_connections() == 0
        await upstream.close()


async def test_upstream_oversized_head_is_refused() -> None:
    async def script(exchange: Exchange) -> None:
        await exchange.send(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        with pytest.raises(UpstreamError, match="oversized"):
            await fetch(upstream, server.url)
        await upstream.close()


@pytest.mark.parametrize(
    ("method", "status"), [("HEAD", "200 OK"), ("GET", "204 No Content"), ("GET", "304 Not Modified")]
)
async def test_upstream_bodiless_answers_do_not_wait_for_a_body(method: str, status: str) -> None:
    async def script(exchange: Exchange) -> None:
        # Content-Length describes the body a GET would get; none follows.
        await exchange.send(f"HTTP/1.1 {status}\r\nContent-Length: 42\r\n\r\n".encode())

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        async with asyncio.timeout(2):
            assert (await fetch(upstream, server.url, method))[1] == b""
            assert (await fetch(upstream, server.url, method))[1] == b""
        assert server.connections == 1
        await upstream.close()


async def test_upstream_chunked_wins_over_content_length_and_the_connection_is_not_reused() -> None:
    async def script(exchange: Exchange) -> None:
        await exchange.send(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n"
        )

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        assert await fetch(upstream, server.url) == (200, b"abcde")
        assert upstream.idle_connections() == 0
        await upstream.close()


async def test_upstream_chunk_without_its_crlf_is_refused() -> None:
    async def script(exchange: Exchange) -> None:
        await exchange.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n")

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        with pytest.raises(UpstreamError, match="chunk not followed by CRLF"):
            await fetch(upstream, server.url)
        assert upstream.idle_connections() == 0
        await upstream.close()


async def test_upstream_bad_chunk_size_is_refused() -> None:
    async def script(exchange: Exchange) -> None:
        await exchange.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n")

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        with pytest.raises(UpstreamError, match="bad chunk size"):
            await fetch(upstream, server.url)
        await upstream.close()


async def test_upstream_callers_own_errors_are_not_reported_as_backend_faults() -> None:
    async def script(exchange: Exchange) -> None:
        await exchange.send(response(b"not json"))

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        with pytest.raises(ValueError, match="caller"):
            async with upstream.request("GET", server.url, None) as answer:
                await answer.read()
                raise ValueError("the caller's translation failed")
        with pytest.raises(OSError, match="caller"):
            async with upstream.request("GET", server.url, None):
                raise OSError("the caller's disk is full")
        await upstream.close()


async def test_upstream_retries_once_when_an_idle_connection_was_closed_by_the_backend() -> None:
    async def script(exchange: Exchange) -> None:
        await exchange.send(response(b"ok"))
        if exchange.index == 0:
            exchange.close()  # as llama-server does with idle keep-alive connections

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        assert await fetch(upstream, server.url) == (200, b"ok")
        await asyncio.sleep(0.05)
        assert await fetch(upstream, server.url) == (200, b"ok")
        assert len(server.requests) == 2 and server.connections == 2
        await upstream.close()


async def test_upstream_no_retry_once_part_of_an_answer_was_read() -> None:
    async def script(exchange: Exchange) -> None:
        if exchange.index == 0:
            await exchange.send(response(b"ok"))
            return
        await exchange.send(b"HTTP/1.1 200 O")  # the backend had the request, then died
        exchange.close()

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        await fetch(upstream, server.url, "POST", b"first")
        with pytest.raises(UpstreamError):
            await fetch(upstream, server.url, "POST", b"second")
        assert len(server.requests) == 2, "a request the backend may have processed is never sent twice"
        await upstream.close()


async def test_upstream_no_retry_on_a_fresh_connection() -> None:
    async def script(exchange: Exchange) -> None:
        exchange.close()

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        with pytest.raises(UpstreamError, match="closed the connection"):
            await fetch(upstream, server.url, "POST", b"x")
        assert len(server.requests) == 1
        await upstream.close()


async def test_upstream_answer_timeout_is_a_504() -> None:
    async def script(exchange: Exchange) -> None:
        await asyncio.sleep(10)

    async with ScriptedServer(script) as server:
        upstream = Upstream(Timeouts(response=0.2))
        with pytest.raises(UpstreamTimeout, match=r"did not answer within 0\.2s") as caught:
            await fetch(upstream, server.url)
        assert caught.value.status == 504
        await upstream.close()


async def test_upstream_body_stall_after_the_head_is_not_cut_by_the_answer_timeout() -> None:
    async def script(exchange: Exchange) -> None:
        await exchange.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await asyncio.sleep(0.4)  # a slow token: streams may pause for as long as generation takes
        await exchange.send(b"1\r\nb\r\n0\r\n\r\n")

    async with ScriptedServer(script) as server:
        upstream = Upstream(Timeouts(response=0.2))
        assert await fetch(upstream, server.url) == (200, b"ab")
        await upstream.close()


async def test_upstream_idle_connections_are_swept_and_capped_per_host() -> None:
    hold = asyncio.Event()

    async def script(exchange: Exchange) -> None:
        if exchange.index < 4:
            await hold.wait()  # four requests in flight at once: four connections
        await exchange.send(response(b"ok"))

    async with ScriptedServer(script) as server:
        upstream = Upstream(Timeouts(idle=0.2), max_idle_per_host=2)
        requests = [asyncio.create_task(fetch(upstream, server.url)) for _ in range(4)]
        await asyncio.sleep(0.05)
        hold.set()
        await asyncio.gather(*requests)
        assert server.connections == 4 and upstream.idle_connections() == 2
        await asyncio.sleep(0.5)
        assert upstream.idle_connections() == 0, "idle connections are closed even when no request comes"
        assert server.closed_connections == 4
        await upstream.close()


async def test_upstream_raw_target_is_sent_verbatim_and_control_characters_are_refused() -> None:
    async def script(exchange: Exchange) -> None:
        await exchange.send(response(exchange.request_line))

    async with ScriptedServer(script) as server:
        upstream = Upstream()
        async with upstream.request("GET", server.url, None, target=b"/a%20b%3Fc%23d?q=%C3%A9") as answer:
            assert await answer.read() == b"GET /a%20b%3Fc%23d?q=%C3%A9 HTTP/1.1"
        with pytest.raises(UpstreamError, match="control characters"):
            async with upstream.request("GET", server.url, None, target=b"/a b HTTP/1.1\r\nX: y"):
                pass
        await upstream.close()
