-- when: tests  expect: test 1: expect.delay_ms
-- A self-test of a bad shape is an error naming the test (check only).
return { tests = { { attempt = { status = 503 }, expect = { delay_ms = { 0 } } } } }
