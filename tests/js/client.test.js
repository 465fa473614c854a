'use strict'
// Drives Torpor's controller with the official `openwhisk` npm client, as an existing
// OpenWhisk user would. tests/test_openwhisk_client.py starts the platform, runs this script
// with the environment below, and asserts on the JSON summary it prints as its last line.
//
//   TORPOR_API_HOST  http://127.0.0.1:PORT of the controller
//   TORPOR_AUTH      UUID:KEY of the namespace
//   TORPOR_ZIP_B64   a zip action (base64) whose __main__.py imports a helper module
//   TORPOR_PREFIX    prefix of the action names this run creates
//
// Every step's outcome goes into the summary, errors included, so that the Python side
// reports exactly which call behaved differently. A failure of the script itself exits 1.

const openwhisk = require('openwhisk')

const { TORPOR_API_HOST: apihost, TORPOR_AUTH: auth, TORPOR_ZIP_B64: zipB64, TORPOR_PREFIX: prefix } = process.env
const POLL_MS = 100
const POLL_LIMIT_MS = 60000
const OVER_PAYLOAD_LIMIT = 1024 * 1024 + 1 // bytes: the controller's default limit is 1 MiB

const HELLO = `
import sys

def main(args):
    print("hello from", args.get("name"))
    print("to stderr", file=sys.stderr)
    return {"greeting": args.get("greeting", "hi") + " " + args.get("name", "nobody")}
`

// The rejection of a call that must fail: HTTP status and error body.
async function failure (call) {
  try {
    const value = await call()
    return { unexpected: value }
  } catch (err) {
    return { status: err.statusCode, body: err.error, message: err.message, name: err.name }
  }
}

// GET of an activation until it exists (it answers 404 while it runs, as OpenWhisk's does).
async function finished (ow, activationId) {
  const deadline = Date.now() + POLL_LIMIT_MS
  for (;;) {
    try {
      return await ow.activations.get({ name: activationId })
    } catch (err) {
      if (err.statusCode !== 404 || Date.now() > deadline) throw err
    }
    await new Promise(resolve => setTimeout(resolve, POLL_MS))
  }
}

async function main () {
  const ow = openwhisk({ apihost, api_key: auth })
  const hello = `${prefix}hello`
  const zipped = `${prefix}zipped`
  const summary = {}

  const created = await ow.actions.create({
    name: hello, action: HELLO, kind: 'python:3', params: { greeting: 'hello' }, annotations: { 'slo-ms': 100 }
  })
  summary.created = { name: created.name, kind: created.exec.kind, version: created.version, annotations: created.annotations }
  const createdZip = await ow.actions.create({ name: zipped, action: Buffer.from(zipB64, 'base64'), kind: 'python:3' })
  summary.createdZip = { name: createdZip.name, kind: createdZip.exec.kind, binary: createdZip.exec.binary }

  summary.listed = (await ow.actions.list()).map(action => action.name)
  const got = await ow.actions.get({ name: hello })
  summary.got = { name: got.name, sameCode: got.exec.code === HELLO, parameters: got.parameters, limits: got.limits }

  const record = await ow.actions.invoke({ name: hello, blocking: true, params: { name: 'Ada' } })
  summary.blocking = { activationId: record.activationId, name: record.name, response: record.response, logs: record.logs }
  summary.blockingResult = await ow.actions.invoke({ name: hello, blocking: true, result: true, params: { name: 'Bo' } })
  // the client above extracts the result itself; this asks the controller to (result=true)
  summary.serverResult = await ow.actions.client.request('POST', `namespaces/_/actions/${hello}`,
    { qs: { blocking: true, result: true }, body: { name: 'Cy' } })
  summary.zipResult = await ow.actions.invoke({ name: zipped, blocking: true, result: true, params: { text: 'swap' } })

  const queued = await ow.actions.invoke({ name: hello, params: { name: 'Di' } })
  const activation = await finished(ow, queued.activationId)
  summary.nonBlocking = {
    queued,
    activation: { activationId: activation.activationId, name: activation.name, response: activation.response },
    result: await ow.activations.result({ name: queued.activationId }),
    logs: await ow.activations.logs({ name: queued.activationId })
  }
  summary.activationsListed = (await ow.activations.list({ name: hello, limit: 10 })).map(a => a.activationId)

  const stranger = openwhisk({ apihost, api_key: auth.split(':')[0] + ':wrong-key' })
  summary.errors = {
    unauthorized: await failure(() => stranger.actions.list()),
    missingAction: await failure(() => ow.actions.get({ name: `${prefix}missing` })),
    missingActivation: await failure(() => ow.activations.get({ name: '0'.repeat(32) })),
    exists: await failure(() => ow.actions.create({ name: hello, action: HELLO, kind: 'python:3' })),
    tooLarge: await failure(() => ow.actions.invoke({ name: hello, blocking: true, params: { blob: 'x'.repeat(OVER_PAYLOAD_LIMIT) } }))
  }

  const updated = await ow.actions.update({ name: hello, action: HELLO, kind: 'python:3', params: { greeting: 'hey' } })
  summary.updated = { version: updated.version, parameters: updated.parameters }
  summary.afterUpdate = await ow.actions.invoke({ name: hello, blocking: true, result: true, params: { name: 'Ed' } })

  summary.deleted = [(await ow.actions.delete({ name: hello })).name, (await ow.actions.delete({ name: zipped })).name]
  summary.afterDelete = {
    get: await failure(() => ow.actions.get({ name: hello })),
    invoke: await failure(() => ow.actions.invoke({ name: zipped, blocking: true })),
    listed: (await ow.actions.list()).map(action => action.name)
  }
  return summary
}

main().then(
  summary => console.log(JSON.stringify(summary)),
  err => {
    console.error(err && err.stack ? err.stack : err)
    process.exit(1)
  }
)
