// An unmodified matrix-js-sdk client (the library Element Web is built on),
// driven by crates/sdk-tests/tests/js_sdk.rs against the real weft binary.
//
// Environment: WEFT_BASE_URL, WEFT_USER_ID, WEFT_ACCESS_TOKEN, WEFT_DEVICE_ID
// (a user the Rust test registered over HTTP).
//
// Protocol: the script syncs (createClient + startClient, lazy-loaded
// members as Element does, no crypto) and prints one JSON object a line on
// stdout: {"op":"ready"} once the first sync is processed, then one answer
// per command it reads on stdin (one JSON object a line):
//   {"op":"room","room_id"}                         what Element shows of the room
//   {"op":"wait_member","room_id","user_id","membership"}
//   {"op":"wait_read","room_id","user_id","event_id"}  user's read receipt reaches the event
//   {"op":"wait_typing","room_id","user_id","typing"}  RoomMember.typing of the user
//   {"op":"quit"}
// A wait that times out answers {"op":..., "timeout": true, ...} with the
// state seen so far, so the Rust side reports what the client showed.
// The SDK's own logging goes to stderr.

import { createClient, ClientEvent, RoomMemberEvent } from "matrix-js-sdk";
import { logger } from "matrix-js-sdk/lib/logger.js";
import { createInterface } from "node:readline";

for (const level of ["log", "info", "debug", "trace", "warn"]) {
  console[level] = (...args) => console.error(...args);
}
logger.setLevel(process.env.JS_SDK_LOG || "warn");

const WAIT_MS = 20000;
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const env = (name) => {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
  return v;
};

const client = createClient({
  baseUrl: env("WEFT_BASE_URL"),
  userId: env("WEFT_USER_ID"),
  accessToken: env("WEFT_ACCESS_TOKEN"),
  deviceId: env("WEFT_DEVICE_ID"),
});

// Every RoomMember.typing event, as [roomId, userId, typing].
const typingEvents = [];
client.on(RoomMemberEvent.Typing, (_event, member) => {
  typingEvents.push([member.roomId, member.userId, member.typing]);
});

/**
 * Waits until `check()` is truthy, re-checking after each sync response is
 * processed (so counts, names and receipts are those of a whole response).
 */
function waitFor(check) {
  const events = [ClientEvent.Sync];
  return new Promise((resolve) => {
    const recheck = () => {
      if (check()) done(true);
    };
    const timer = setTimeout(() => done(false), WAIT_MS);
    const done = (ok) => {
      clearTimeout(timer);
      for (const e of events) client.off(e, recheck);
      resolve(ok);
    };
    for (const e of events) client.on(e, recheck);
    recheck();
  });
}

function roomView(roomId) {
  const room = client.getRoom(roomId);
  if (!room) return { known: false };
  const member = (m) => ({ user_id: m.userId, membership: m.membership, name: m.name });
  return {
    known: true,
    my_membership: room.getMyMembership(),
    joined: room.getJoinedMemberCount(),
    invited: room.getInvitedMemberCount(),
    name: room.name,
    default_name: room.getDefaultRoomName(client.getUserId()),
    members: room.getMembers().map(member).sort((a, b) => a.user_id.localeCompare(b.user_id)),
  };
}

function readView(roomId, userId, eventId) {
  const room = client.getRoom(roomId);
  if (!room) return { known: false };
  const event = room.findEventById(eventId);
  return {
    known: true,
    event_known: !!event,
    read_up_to: room.getEventReadUpTo(userId),
    users_read_up_to: event ? room.getUsersReadUpTo(event) : null,
    receipts: event
      ? room.getReceiptsForEvent(event).map((r) => ({ type: r.type, user_id: r.userId, ts: r.data?.ts ?? null }))
      : null,
  };
}

async function handle(cmd) {
  switch (cmd.op) {
    case "room":
      return { op: "room", ...roomView(cmd.room_id) };
    case "wait_member": {
      const ok = await waitFor(
        () => client.getRoom(cmd.room_id)?.getMember(cmd.user_id)?.membership === cmd.membership,
      );
      return { op: "wait_member", timeout: !ok, ...roomView(cmd.room_id) };
    }
    case "wait_read": {
      const ok = await waitFor(
        () => client.getRoom(cmd.room_id)?.getEventReadUpTo(cmd.user_id) === cmd.event_id,
      );
      return { op: "wait_read", timeout: !ok, ...readView(cmd.room_id, cmd.user_id, cmd.event_id) };
    }
    case "wait_typing": {
      const ok = await waitFor(
        () => client.getRoom(cmd.room_id)?.getMember(cmd.user_id)?.typing === cmd.typing,
      );
      const member = client.getRoom(cmd.room_id)?.getMember(cmd.user_id);
      return {
        op: "wait_typing",
        timeout: !ok,
        typing: member ? member.typing : null,
        events: typingEvents.filter(([room, user]) => room === cmd.room_id && user === cmd.user_id).map((e) => e[2]),
      };
    }
    case "quit":
      client.stopClient();
      return { op: "quit" };
    default:
      return { op: cmd.op, error: "unknown op" };
  }
}

client.once(ClientEvent.Sync, (state) => {
  if (state !== "PREPARED") {
    out({ op: "ready", error: `first sync state ${state}` });
    process.exit(1);
  }
  out({ op: "ready", user_id: client.getUserId() });
  const lines = createInterface({ input: process.stdin });
  // One command at a time, in order.
  let queue = Promise.resolve();
  lines.on("line", (line) => {
    queue = queue.then(async () => {
      if (!line.trim()) return;
      let answer;
      try {
        answer = await handle(JSON.parse(line));
      } catch (err) {
        answer = { op: "error", error: String(err && err.stack ? err.stack : err) };
      }
      out(answer);
      if (answer.op === "quit") process.exit(0);
    });
  });
  // End of input: answer what is queued, then stop.
  lines.on("close", () => {
    queue = queue.then(() => {
      client.stopClient();
      process.exit(0);
    });
  });
});

await client.startClient({ initialSyncLimit: 20, lazyLoadMembers: true });
