//! What `sund chat` shows, and what a key press means: a state without I/O, drawn with
//! ratatui, so it is tested on ratatui's test backend.
//!
//! Left, the conversations (with unread counts); right, the selected one's messages; below, the
//! input line and a status bar (connection, messages waiting for the gateway, the MLS epoch).

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, List, ListItem, ListState, Paragraph, Wrap};
use ratatui::Frame;
use sund_model::ids::{ConversationId, MsgId};
use sund_node::display;

/// Lines kept per conversation (older ones scroll away; they stay on the device).
const LINES_KEPT: usize = 500;

/// Where the device stands with its gateway, for the status bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Connection {
    Connected,
    Reconnecting(u32),
    Offline,
}

/// One conversation in the list.
#[derive(Debug)]
struct Conversation {
    id: ConversationId,
    name: String,
    epoch: Option<u64>,
    unread: usize,
    lines: Vec<ChatLine>,
}

/// One line of a conversation.
#[derive(Debug)]
struct ChatLine {
    /// The seq the gateway gave it; `None` while it waits for the gateway.
    seq: Option<u64>,
    /// Our id, for a message this device sent.
    msg_id: Option<MsgId>,
    from: String,
    text: String,
    /// Refused by the gateway (it will not arrive).
    failed: bool,
}

/// What a key press asks of the driver.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing beyond redrawing.
    None,
    /// Send this text into the conversation.
    Send(ConversationId, String),
    /// Start a DM with this user.
    Dm(String),
    /// Leave the chat.
    Quit,
}

/// The whole screen's state.
#[derive(Debug)]
pub(crate) struct ChatView {
    conversations: Vec<Conversation>,
    selected: usize,
    input: String,
    connection: Connection,
    /// Messages in the outbox, waiting for the gateway's acknowledgement.
    pending: usize,
    /// The last thing the user should read (an error, a hint), shown in the status bar.
    notice: Option<String>,
}

impl ChatView {
    /// An empty chat, offline until the node says otherwise.
    pub(crate) fn new() -> ChatView {
        ChatView {
            conversations: Vec::new(),
            selected: 0,
            input: String::new(),
            connection: Connection::Offline,
            pending: 0,
            notice: None,
        }
    }

    /// Adds a conversation, or renames it and updates its epoch if it is listed already.
    pub(crate) fn conversation(&mut self, id: ConversationId, name: &str, epoch: Option<u64>) {
        match self.conversations.iter_mut().find(|c| c.id == id) {
            Some(c) => {
                c.name = name.to_string();
                c.epoch = epoch.or(c.epoch);
            }
            None => self.conversations.push(Conversation {
                id,
                name: name.to_string(),
                epoch,
                unread: 0,
                lines: Vec::new(),
            }),
        }
    }

    /// Drops a conversation this device left or was removed from.
    pub(crate) fn remove_conversation(&mut self, id: ConversationId) {
        self.conversations.retain(|c| c.id != id);
        self.selected = self
            .selected
            .min(self.conversations.len().saturating_sub(1));
    }

    /// Selects a conversation by id (after the user started it).
    pub(crate) fn select(&mut self, id: ConversationId) {
        if let Some(i) = self.conversations.iter().position(|c| c.id == id) {
            self.selected = i;
            self.conversations[i].unread = 0;
        }
    }

    /// The selected conversation's id.
    pub(crate) fn selected(&self) -> Option<ConversationId> {
        self.conversations.get(self.selected).map(|c| c.id)
    }

    /// A message arrived. One this device sent (`msg_id` matches a waiting line) replaces its
    /// waiting line instead of showing twice.
    pub(crate) fn delivered(
        &mut self,
        id: ConversationId,
        seq: u64,
        msg_id: MsgId,
        from: &str,
        text: &str,
    ) {
        if !self.conversations.iter().any(|c| c.id == id) {
            self.conversation(id, &id.to_string(), None);
        }
        let selected = self.selected();
        let c = self
            .conversations
            .iter_mut()
            .find(|c| c.id == id)
            .expect("added above");
        if let Some(line) = c.lines.iter_mut().find(|l| l.msg_id == Some(msg_id)) {
            line.seq = Some(seq);
            return;
        }
        push_line(
            &mut c.lines,
            ChatLine {
                seq: Some(seq),
                msg_id: Some(msg_id),
                from: from.to_string(),
                text: text.to_string(),
                failed: false,
            },
        );
        if selected != Some(id) {
            c.unread += 1;
        }
    }

    /// This device sent a message: shown at once, marked as waiting for the gateway.
    pub(crate) fn sent(&mut self, id: ConversationId, msg_id: MsgId, text: &str) {
        if let Some(c) = self.conversations.iter_mut().find(|c| c.id == id) {
            push_line(
                &mut c.lines,
                ChatLine {
                    seq: None,
                    msg_id: Some(msg_id),
                    from: "me".into(),
                    text: text.to_string(),
                    failed: false,
                },
            );
        }
    }

    /// The gateway sequenced one of this device's messages.
    pub(crate) fn accepted(&mut self, msg_id: MsgId, seq: u64) {
        if let Some(line) = self.line_of(msg_id) {
            line.seq = Some(seq);
        }
    }

    /// The gateway refused one of this device's messages.
    pub(crate) fn rejected(&mut self, msg_id: MsgId, why: &str) {
        if let Some(line) = self.line_of(msg_id) {
            line.failed = true;
        }
        self.notice = Some(format!("a message was refused: {why}"));
    }

    fn line_of(&mut self, msg_id: MsgId) -> Option<&mut ChatLine> {
        self.conversations
            .iter_mut()
            .flat_map(|c| c.lines.iter_mut())
            .find(|l| l.msg_id == Some(msg_id))
    }

    /// The connection changed.
    pub(crate) fn connection(&mut self, connection: Connection) {
        self.connection = connection;
    }

    /// How many messages wait in the outbox.
    pub(crate) fn pending(&mut self, pending: usize) {
        self.pending = pending;
    }

    /// Something the user should read.
    pub(crate) fn notice(&mut self, text: impl Into<String>) {
        self.notice = Some(text.into());
    }

    /// What a key press means; edits the input line and the selection itself.
    pub(crate) fn key(&mut self, key: KeyEvent) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::None;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('c' | 'd') if ctrl => Action::Quit,
            KeyCode::Esc => Action::Quit,
            KeyCode::Tab | KeyCode::Down => {
                self.step(1);
                Action::None
            }
            KeyCode::BackTab | KeyCode::Up => {
                self.step(-1);
                Action::None
            }
            KeyCode::Backspace => {
                self.input.pop();
                Action::None
            }
            KeyCode::Char(c) if !ctrl => {
                self.input.push(c);
                Action::None
            }
            KeyCode::Enter => self.submit(),
            _ => Action::None,
        }
    }

    fn step(&mut self, by: isize) {
        let n = self.conversations.len();
        if n == 0 {
            return;
        }
        self.selected = (self.selected as isize + by).rem_euclid(n as isize) as usize;
        self.conversations[self.selected].unread = 0;
    }

    /// Enter: `/dm USER` starts a DM, `/quit` leaves, anything else is sent.
    fn submit(&mut self) -> Action {
        let text = std::mem::take(&mut self.input);
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Action::None;
        }
        if trimmed == "/quit" {
            return Action::Quit;
        }
        if let Some(user) = trimmed.strip_prefix("/dm") {
            let user = user.trim();
            if user.is_empty() || user.contains(char::is_whitespace) {
                self.notice = Some("start a DM with `/dm USER` (one user name)".into());
                self.input = text;
                return Action::None;
            }
            return Action::Dm(user.to_string());
        }
        if trimmed.starts_with('/') {
            self.notice = Some(format!(
                "unknown command `{trimmed}`: /dm USER starts a DM, /quit leaves (Esc too)"
            ));
            self.input = text;
            return Action::None;
        }
        match self.selected() {
            Some(id) => {
                self.notice = None;
                Action::Send(id, text)
            }
            None => {
                self.notice = Some("no conversation yet: start one with `/dm USER`".into());
                self.input = text;
                Action::None
            }
        }
    }

    /// Draws the whole screen.
    pub(crate) fn draw(&self, frame: &mut Frame) {
        let [main, input, status] = Layout::vertical([
            Constraint::Min(3),
            Constraint::Length(3),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        let [list, messages] =
            Layout::horizontal([Constraint::Length(24), Constraint::Min(10)]).areas(main);
        self.draw_list(frame, list);
        self.draw_messages(frame, messages);
        let prompt = Paragraph::new(format!("> {}", self.input))
            .block(Block::default().borders(Borders::ALL).title(" message "));
        frame.render_widget(prompt, input);
        // The cursor after the typed text (inside the border and the prompt).
        let typed = self.input.chars().count() as u16;
        frame.set_cursor_position((
            (input.x + 3 + typed).min(input.right().saturating_sub(2)),
            input.y + 1,
        ));
        frame.render_widget(Paragraph::new(self.status_line()), status);
    }

    fn draw_list(&self, frame: &mut Frame, area: Rect) {
        let items: Vec<ListItem> = self
            .conversations
            .iter()
            .map(|c| {
                let name = display::printable(&c.name).into_owned();
                if c.unread > 0 {
                    ListItem::new(format!("{name} ({})", c.unread)).bold()
                } else {
                    ListItem::new(name)
                }
            })
            .collect();
        let list = List::new(items)
            .block(Block::default().borders(Borders::ALL).title(" chats "))
            .highlight_style(Style::default().add_modifier(Modifier::REVERSED))
            .highlight_symbol("▶ ");
        let mut state = ListState::default();
        state.select((!self.conversations.is_empty()).then_some(self.selected));
        frame.render_stateful_widget(list, area, &mut state);
    }

    fn draw_messages(&self, frame: &mut Frame, area: Rect) {
        let Some(c) = self.conversations.get(self.selected) else {
            let hint = Paragraph::new("No DM or room yet. Type /dm USER and Enter to start one.")
                .wrap(Wrap { trim: true })
                .block(Block::default().borders(Borders::ALL));
            frame.render_widget(hint, area);
            return;
        };
        let title = format!(" {} ", display::printable(&c.name));
        // The newest lines that fit (each as one row; long ones are cut by the border).
        let rows = area.height.saturating_sub(2) as usize;
        let lines: Vec<Line> = c.lines[c.lines.len().saturating_sub(rows)..]
            .iter()
            .map(|l| {
                let mark = match (l.seq, l.failed) {
                    (_, true) => Span::styled("✗ ", Style::default().fg(Color::Red)),
                    (None, false) => Span::styled("… ", Style::default().fg(Color::Yellow)),
                    (Some(_), false) => Span::raw("  "),
                };
                Line::from(vec![
                    mark,
                    Span::styled(
                        format!("{}: ", display::printable(&l.from)),
                        Style::default().add_modifier(Modifier::BOLD),
                    ),
                    Span::raw(display::printable(&l.text).into_owned()),
                ])
            })
            .collect();
        let view = Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(title));
        frame.render_widget(view, area);
    }

    fn status_line(&self) -> Line<'static> {
        let (word, colour) = match self.connection {
            Connection::Connected => ("connected".to_string(), Color::Green),
            Connection::Reconnecting(attempt) => {
                (format!("reconnecting (attempt {attempt})"), Color::Yellow)
            }
            Connection::Offline => ("offline".to_string(), Color::Red),
        };
        let mut spans = vec![Span::styled(word, Style::default().fg(colour))];
        spans.push(Span::raw(format!(" | {} pending", self.pending)));
        if let Some(c) = self.conversations.get(self.selected) {
            if let Some(epoch) = c.epoch {
                spans.push(Span::raw(format!(" | epoch {epoch}")));
            }
        }
        match &self.notice {
            Some(notice) => spans.push(Span::raw(format!(" | {notice}"))),
            None => spans.push(Span::raw(" | Tab: next chat, Esc: quit")),
        }
        Line::from(spans)
    }
}

fn push_line(lines: &mut Vec<ChatLine>, line: ChatLine) {
    lines.push(line);
    if lines.len() > LINES_KEPT {
        lines.drain(..lines.len() - LINES_KEPT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen(view: &ChatView) -> String {
        let mut terminal = Terminal::new(TestBackend::new(70, 12)).unwrap();
        terminal.draw(|f| view.draw(f)).unwrap();
        terminal.backend().to_string()
    }

    fn press(view: &mut ChatView, code: KeyCode) -> Action {
        view.key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn type_text(view: &mut ChatView, text: &str) {
        for c in text.chars() {
            assert_eq!(press(view, KeyCode::Char(c)), Action::None);
        }
    }

    const BOB: ConversationId = ConversationId(1);
    const TEAM: ConversationId = ConversationId(2);

    fn two_chats() -> ChatView {
        let mut view = ChatView::new();
        view.conversation(BOB, "@bob", Some(1));
        view.conversation(TEAM, "team", Some(4));
        view.connection(Connection::Connected);
        view
    }

    #[test]
    fn an_empty_chat_says_how_to_start_one() {
        insta::assert_snapshot!(screen(&ChatView::new()));
    }

    #[test]
    fn messages_unread_counts_pending_and_status_are_drawn() {
        let mut view = two_chats();
        view.delivered(BOB, 1, MsgId(10), "bob", "hi there");
        view.sent(BOB, MsgId(11), "hello bob");
        view.delivered(TEAM, 5, MsgId(12), "carol", "standup\u{1b}[31m at 10");
        view.delivered(TEAM, 6, MsgId(13), "dave", "ok");
        view.pending(1);
        insta::assert_snapshot!(screen(&view));
        // The other chat: its unread count clears, and a control sequence shows escaped.
        press(&mut view, KeyCode::Tab);
        insta::assert_snapshot!("team", screen(&view));
    }

    #[test]
    fn a_sent_line_waits_then_takes_its_seq_once_even_if_delivered_back() {
        let mut view = two_chats();
        view.sent(BOB, MsgId(7), "mine");
        view.delivered(BOB, 3, MsgId(7), "me", "mine");
        assert_eq!(view.conversations[0].lines.len(), 1);
        assert_eq!(view.conversations[0].lines[0].seq, Some(3));
        view.sent(BOB, MsgId(8), "refused");
        view.rejected(MsgId(8), "not a member");
        assert!(view.conversations[0].lines[1].failed);
        assert!(screen(&view).contains("a message was refused: not a member"));
    }

    #[test]
    fn keys_switch_chats_edit_send_and_start_dms() {
        let mut view = two_chats();
        view.delivered(TEAM, 1, MsgId(1), "carol", "unread");
        assert_eq!(view.conversations[1].unread, 1);
        assert_eq!(press(&mut view, KeyCode::Tab), Action::None);
        assert_eq!(view.selected(), Some(TEAM));
        assert_eq!(view.conversations[1].unread, 0, "seen once selected");
        type_text(&mut view, "hellp");
        press(&mut view, KeyCode::Backspace);
        type_text(&mut view, "o");
        assert_eq!(
            press(&mut view, KeyCode::Enter),
            Action::Send(TEAM, "hello".into())
        );
        assert_eq!(
            press(&mut view, KeyCode::Enter),
            Action::None,
            "empty input"
        );
        type_text(&mut view, "/dm erin");
        assert_eq!(press(&mut view, KeyCode::Enter), Action::Dm("erin".into()));
        type_text(&mut view, "/dm two words");
        assert_eq!(press(&mut view, KeyCode::Enter), Action::None);
        assert_eq!(view.input, "/dm two words", "kept to be corrected");
        view.input.clear();
        type_text(&mut view, "/frobnicate");
        assert_eq!(press(&mut view, KeyCode::Enter), Action::None);
        assert!(view.notice.as_deref().unwrap().contains("unknown command"));
        assert_eq!(press(&mut view, KeyCode::Up), Action::None);
        assert_eq!(view.selected(), Some(BOB));
        assert_eq!(
            view.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
        assert_eq!(press(&mut view, KeyCode::Esc), Action::Quit);
    }

    #[test]
    fn nothing_is_sent_without_a_conversation() {
        let mut view = ChatView::new();
        type_text(&mut view, "into the void");
        assert_eq!(press(&mut view, KeyCode::Enter), Action::None);
        assert!(view.notice.as_deref().unwrap().contains("/dm USER"));
        assert_eq!(view.input, "into the void");
    }

    #[test]
    fn a_removed_conversation_leaves_the_list_and_the_selection_stays_valid() {
        let mut view = two_chats();
        press(&mut view, KeyCode::Tab);
        view.remove_conversation(TEAM);
        assert_eq!(view.selected(), Some(BOB));
        view.remove_conversation(BOB);
        assert_eq!(view.selected(), None);
        screen(&view);
    }

    #[test]
    fn old_lines_scroll_away_beyond_the_limit() {
        let mut view = two_chats();
        for i in 0..(LINES_KEPT as u64 + 10) {
            view.delivered(BOB, i + 1, MsgId(i.into()), "bob", "x");
        }
        assert_eq!(view.conversations[0].lines.len(), LINES_KEPT);
        assert_eq!(view.conversations[0].lines[0].seq, Some(11));
    }
}
