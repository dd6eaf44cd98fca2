// The sandbox chat page. Everything shown is built with textContent: the bot's HTML arrives
// already parsed into Telegram entities (bold, code, pre, links), and only those become markup.
"use strict";

const state = { people: [], chats: [], bot: null, chatId: null, replyTo: null };
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function me() {
  return state.people.find((p) => String(p.user_id) === $("person").value);
}

function chatTitle(chat) {
  if (chat.type === "private") {
    const person = state.people.find((p) => p.user_id === chat.id);
    return `${person ? person.name : chat.id} ↔ bot (private)`;
  }
  return chat.title || String(chat.id);
}

// Telegram entities → DOM. Offsets are UTF-16 code units, as JavaScript strings count them.
function renderText(text, entities) {
  const root = document.createDocumentFragment();
  const tags = { bold: "b", italic: "i", underline: "u", strikethrough: "s", code: "code",
    pre: "pre", text_link: "a", spoiler: "span", blockquote: "blockquote" };
  const sorted = (entities || []).filter((e) => tags[e.type])
    .sort((a, b) => a.offset - b.offset || b.length - a.length);
  function build(parent, start, end, list) {
    let at = start;
    while (list.length && list[0].offset < end) {
      const entity = list.shift();
      if (entity.offset < at) continue; // overlapping: keep the outer one
      if (entity.offset > at) parent.append(document.createTextNode(text.slice(at, entity.offset)));
      const node = document.createElement(tags[entity.type]);
      if (entity.type === "text_link" && /^https?:\/\//.test(entity.url || "")) {
        node.href = entity.url;
        node.rel = "noopener noreferrer";
        node.target = "_blank";
      }
      const inner = [];
      while (list.length && list[0].offset < entity.offset + entity.length) inner.push(list.shift());
      build(node, entity.offset, entity.offset + entity.length, inner);
      parent.append(node);
      at = entity.offset + entity.length;
    }
    if (at < end) parent.append(document.createTextNode(text.slice(at, end)));
  }
  build(root, 0, text.length, sorted);
  return root;
}

function renderMessage(message) {
  const item = document.createElement("li");
  item.className = "msg";
  item.dataset.id = message.message_id;
  const from = message.from || {};
  if (me() && from.id === me().user_id) item.classList.add("mine");
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = from.is_bot ? `${from.first_name} (bot)` : from.first_name || "?";
  const reply = document.createElement("button");
  reply.type = "button";
  reply.className = "reply";
  reply.textContent = "reply";
  reply.addEventListener("click", () => startReply(message));
  who.append(reply);
  item.append(who);
  const body = document.createElement("div");
  body.append(renderText(message.text || message.caption || "",
    message.entities || message.caption_entities));
  item.append(body);
  if (message.document) {
    const link = document.createElement("a");
    link.href = `/sandbox/documents/${encodeURIComponent(message.document.file_id)}` +
      `?name=${encodeURIComponent(message.document.file_name || "document")}`;
    link.textContent = `⬇ ${message.document.file_name || "document"}`;
    link.setAttribute("download", message.document.file_name || "document");
    item.append(link);
  }
  const rows = (message.reply_markup && message.reply_markup.inline_keyboard) || [];
  if (rows.length) {
    const keyboard = document.createElement("div");
    keyboard.className = "keyboard";
    for (const row of rows) {
      for (const button of row) {
        const tap = document.createElement("button");
        tap.type = "button";
        tap.textContent = button.text;
        tap.addEventListener("click", () => press(message, button.callback_data));
        keyboard.append(tap);
      }
    }
    item.append(keyboard);
  }
  if (message.edits) {
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = "edited";
    item.append(meta);
  }
  return item;
}

function currentChat() {
  return state.chats.find((c) => c.id === state.chatId);
}

function renderChats() {
  const nav = $("chats");
  nav.replaceChildren();
  for (const chat of state.chats) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = chatTitle(chat);
    button.setAttribute("aria-current", String(chat.id === state.chatId));
    button.addEventListener("click", () => { state.chatId = chat.id; cancelReply(); renderAll(); });
    nav.append(button);
  }
}

function renderMessages() {
  const chat = currentChat();
  $("chat-title").textContent = chat ? chatTitle(chat) : "";
  const list = $("messages");
  list.replaceChildren(...(chat ? chat.messages.map(renderMessage) : []));
  list.scrollTop = list.scrollHeight;
}

function renderAll() {
  renderChats();
  renderMessages();
}

function toast(text, alert) {
  const note = document.createElement("div");
  note.className = alert ? "toast alert" : "toast";
  note.textContent = text;
  $("toasts").append(note);
  setTimeout(() => note.remove(), alert ? 6000 : 3500);
}

// Taps made on this page, and the bot's answers: the answer can arrive over SSE before the
// tap's own HTTP response does, so whichever comes second shows the toast.
const myTaps = new Set();
const answers = new Map();

function showAnswer(queryId) {
  if (!myTaps.has(queryId) || !answers.has(queryId)) return;
  const answer = answers.get(queryId);
  myTaps.delete(queryId);
  answers.delete(queryId);
  if (answer.text) toast(answer.text, answer.show_alert);
}

async function press(message, data) {
  try {
    const tapped = await api("/sandbox/tap", {
      chat_id: message.chat.id, message_id: message.message_id, user_id: me().user_id, data,
    });
    myTaps.add(tapped.callback_query_id);
    showAnswer(tapped.callback_query_id);
  } catch (error) {
    toast(error.message, true);
  }
}

function startReply(message) {
  state.replyTo = message.message_id;
  $("replying").hidden = false;
  // Who said what, not the message id (the sandbox's ids come from the clock: long numbers).
  const who = (message.from && message.from.first_name) || "?";
  const words = (message.text || message.caption || "").split("\n")[0].slice(0, 60);
  $("replying").querySelector("span").textContent = `${who}: “${words}”`;
  $("text").focus();
}

function cancelReply() {
  state.replyTo = null;
  $("replying").hidden = true;
}

async function send(event) {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  try {
    await api("/sandbox/say", {
      chat_id: state.chatId, user_id: me().user_id, text, reply_to_message_id: state.replyTo,
    });
    $("text").value = "";
    cancelReply();
  } catch (error) {
    toast(error.message, true);
  }
}

function upsert(chatId, message) {
  const chat = state.chats.find((c) => c.id === chatId);
  if (!chat) return;
  const index = chat.messages.findIndex((m) => m.message_id === message.message_id);
  if (index >= 0) chat.messages[index] = message; else chat.messages.push(message);
  if (chatId === state.chatId) renderMessages();
}

function listen() {
  const events = new EventSource("/sandbox/events");
  events.onopen = () => {
    load().catch((error) => toast(`cannot load the sandbox: ${error.message}`, true));
  };
  events.onmessage = (event) => {
    const data = JSON.parse(event.data);
    if (data.type === "message" || data.type === "edited_message") {
      upsert(data.chat_id, data.message);
      // A ForceReply prompt aimed at me: answer it by replying.
      if (data.message.ui_markup && data.message.ui_markup.force_reply &&
          data.chat_id === state.chatId && (data.message.text || "").includes(me().name)) {
        startReply(data.message);
      }
    } else if (data.type === "callback_answer") {
      answers.set(data.callback_query_id, data);
      showAnswer(data.callback_query_id);
    }
  };
}

async function load() {
  const snapshot = await api("/sandbox/state");
  Object.assign(state, { people: snapshot.people, chats: snapshot.chats, bot: snapshot.bot });
  const select = $("person");
  if (!select.options.length) {
    for (const person of snapshot.people) {
      const option = document.createElement("option");
      option.value = person.user_id;
      option.textContent = `${person.name} — ${person.role}`;
      select.append(option);
    }
    select.addEventListener("change", renderAll);
  }
  const commands = $("commands");
  commands.replaceChildren(...snapshot.commands.map((c) => {
    const option = document.createElement("option");
    option.value = `/${c.command} `;
    option.label = c.description;
    return option;
  }));
  if (state.chatId === null && state.chats.length) {
    state.chatId = (state.chats.find((c) => c.type !== "private") || state.chats[0]).id;
  }
  renderAll();
}

$("composer").addEventListener("submit", send);
$("cancel-reply").addEventListener("click", cancelReply);
// Listen first, and (re)load the whole state each time the stream (re)connects: nothing sent
// between a snapshot and the stream's start can be missed (messages merge by id).
listen();
